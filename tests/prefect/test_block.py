"""The block: Prefect's standard block checks, save/load round trip, registration and the entry point."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from prefect import get_client
from prefect.blocks.core import Block
from prefect.client.schemas.actions import BlockDocumentCreate
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import SecretStr, ValidationError

import prefect_blocks
from prefect_blocks import SingletonBlock
from prefect_blocks._block import LOGO_URL, URL_PATTERN

from .conftest import ROOT, held_elsewhere


class TestSingletonBlockStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[Block]:
        return SingletonBlock

    def test_has_a_valid_image(self, block: type[Block]) -> None:
        """Offline instead of Prefect's download: the logo URL serves the PNG shipped in the package."""
        assert str(block._logo_url) == LOGO_URL
        shipped = Path(prefect_blocks.__file__).parent / "logo.png"
        assert LOGO_URL.endswith("/main/prefect_blocks/logo.png")
        data = shipped.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert width == height, "Logo should be a square image"
        assert 1000 > width > 45


def test_save_and_load_by_name(tmp_path: Path) -> None:
    name = f"round-trip-{uuid.uuid4().hex[:8]}"
    url = "postgresql://app:s3cret@db.example:5432/locks"
    SingletonBlock(url=url, lock_expire_seconds=90, auto_renew=False, name_prefix="etl/").save(name)
    loaded = SingletonBlock.load(name)
    assert isinstance(loaded, SingletonBlock)
    assert loaded.url.get_secret_value() == url
    assert (loaded.lock_expire_seconds, loaded.auto_renew, loaded.name_prefix) == (90, False, "etl/")
    # The password never shows: not in repr, not in the API's view of the document.
    assert "s3cret" not in repr(loaded) and "s3cret" not in str(loaded.url)
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name, "singleton", include_secrets=False)
    assert "s3cret" not in str(document.data)
    # Loading through the base class finds the type by its slug.
    assert Block.load(f"singleton/{name}") == loaded


def test_entry_point_lets_block_load_find_it(child_env: dict[str, str], store_url: str) -> None:
    name = f"entry-point-{uuid.uuid4().hex[:8]}"
    SingletonBlock(url=store_url).save(name)
    # A fresh process that never imports prefect_blocks: Prefect loads it from the
    # ``prefect.collections`` entry point when it meets the "singleton" block type.
    code = (
        "import sys; from prefect.blocks.core import Block\n"
        "assert 'prefect_blocks' not in sys.modules\n"
        f"block = Block.load('singleton/{name}')\n"
        "print(type(block).__module__, type(block).__name__)\n"
        "with block.lock('entry-point-check') as held: print(held.fencing_token)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=child_env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    module, cls, token = result.stdout.split()
    assert (module, cls) == ("prefect_blocks._block", "SingletonBlock") and int(token) >= 1


def test_registers_with_the_prefect_cli(child_env: dict[str, str]) -> None:
    prefect = Path(sys.executable).with_name("prefect")
    result = subprocess.run([str(prefect), "block", "register", "-m", "prefect_blocks"],
                            capture_output=True, text=True, check=False, env=child_env, cwd=ROOT, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Singleton" in result.stdout
    with get_client(sync_client=True) as client:
        block_type = client.read_block_type_by_slug("singleton")
        schema = client.get_most_recent_block_schema_for_block_type(block_type.id)
    assert block_type.name == "Singleton" and str(block_type.logo_url) == LOGO_URL
    assert "from prefect_blocks import SingletonBlock" in block_type.code_example
    assert schema.fields["secret_fields"] == ["url"]
    assert set(schema.fields["properties"]) == {"url", "lock_expire_seconds", "never_expires", "auto_renew", "name_prefix"}
    assert schema.fields["properties"]["url"]["pattern"] == URL_PATTERN
    assert schema.fields["required"] == ["url"]
    # The UI fills in the first BLOCK_NAME only: the example says it once, so it works when pasted.
    assert block_type.code_example.count("BLOCK_NAME") == 1


def test_the_code_example_runs_when_pasted(store_url: str, lock_name: str) -> None:
    """What the block page shows, with BLOCK_NAME replaced once as the UI does, runs as is."""
    name = f"pasted-{uuid.uuid4().hex[:8]}"
    SingletonBlock(url=store_url).save(name)
    code = textwrap.dedent(SingletonBlock._code_example).strip().removeprefix("```python").removesuffix("```")
    namespace: dict = {}
    exec(compile(code.replace("BLOCK_NAME", name, 1), "<block page>", "exec"), namespace)  # the pasted example
    assert namespace["nightly"](return_state=True).name == "Completed"
    assert namespace["export"]("eu", return_state=True).name == "Completed"
    with held_elsewhere(store_url, "export-eu"):
        assert namespace["export"]("eu", return_state=True).name == "Skipped"


def test_the_schema_refuses_a_url_without_a_scheme() -> None:
    """Prefect's own schema validation (what the UI's form runs before saving) applies the pattern."""
    from prefect.utilities.schema_tools.validation import validate

    schema = SingletonBlock.model_json_schema()
    validate({"url": "redis://127.0.0.1:6379/0"}, schema, raise_on_error=True)
    with pytest.raises(Exception, match="does not match"):
        validate({"url": "127.0.0.1:6379"}, schema, raise_on_error=True)


def test_never_expires_survives_a_save_and_load() -> None:
    name = f"never-{uuid.uuid4().hex[:8]}"
    # As the form saves it: the lease field left at its default, auto renew left on.
    SingletonBlock(url="redis://127.0.0.1:6379/0", never_expires=True).save(name)
    loaded = SingletonBlock.load(name)
    assert loaded.never_expires and loaded.lease_seconds is None
    lock = loaded.get_singleton("x")
    assert lock.lock_expire_seconds is None and lock.auto_renew is False


def test_a_saved_block_that_does_not_validate_says_why() -> None:
    """A document saved around the form (API, older schema) fails at load with the reason, not Prefect's generic one."""
    name = f"broken-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        block_type = client.read_block_type_by_slug("singleton")
        schema = client.get_most_recent_block_schema_for_block_type(block_type.id)
        client.create_block_document(BlockDocumentCreate(
            name=name, block_type_id=block_type.id, block_schema_id=schema.id,
            data={"url": "user:hunter2@db.example:5432"},
        ))
    with pytest.raises(ValueError, match=rf"Singleton block '{name}' cannot be used: url: .*needs a scheme") as raised:
        SingletonBlock.load(name)
    assert "hunter2" not in str(raised.value) and "failed validation" not in str(raised.value)


def test_rejects_bad_configuration() -> None:
    with pytest.raises(ValidationError, match="needs a scheme"):
        SingletonBlock(url="127.0.0.1:6379")
    with pytest.raises(ValidationError, match="auto_renew needs lock_expire_seconds"):
        SingletonBlock(url="redis://127.0.0.1:6379/0", lock_expire_seconds=None, auto_renew=True)
    with pytest.raises(ValidationError):
        SingletonBlock(url="redis://127.0.0.1:6379/0", lock_expire_seconds=0)
    never = SingletonBlock(url=SecretStr("redis://127.0.0.1:6379/0"), lock_expire_seconds=None, auto_renew=False)
    assert never.get_singleton("x").lock_expire_seconds is None


def test_bad_url_message_hides_the_password() -> None:
    with pytest.raises(ValidationError) as raised:
        SingletonBlock(url="no-scheme-user:hunter2@host")
    assert "hunter2" not in str(raised.value)
