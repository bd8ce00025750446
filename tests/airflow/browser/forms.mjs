// The provider's connection forms in a real browser (headless Chromium, playwright-core).
//
// node forms.mjs BASE_URL OUT_DIR STORED_CONN_ID SECRET
// Prints one JSON object of facts; the pytest test asserts on them. Screenshots go to OUT_DIR.
import { chromium } from 'playwright-core';

const [base, outDir, storedId, secret] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
const facts = { forms: {}, stored: {} };
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.setDefaultTimeout(60000);
  await page.goto(`${base}/connections`, { waitUntil: 'networkidle', timeout: 120000 });

  await page.getByRole('button', { name: /Add Connection/i }).first().click();
  await page.locator('input[name=connection_id]').fill('forms_check');
  const forms = [
    ['url', 'Singleton lock store (URL)'],
    ['sqlite', 'Singleton lock store: SQLite'],
    ['redis', 'Singleton lock store: Redis'],
    ['postgres', 'Singleton lock store: PostgreSQL'],
  ];
  for (const [key, hookName] of forms) {
    const select = page.locator('input[role=combobox]');
    await select.click();
    await select.fill(hookName);
    await page.keyboard.press('Enter');
    await page.getByText('Standard Fields').first().waitFor();
    await page.waitForTimeout(500);
    await page.locator('[role=dialog]').first().screenshot({ path: `${outDir}/airflow-connection-${key}.png` });
    facts.forms[key] = {
      labels: await page.locator('[role=dialog] label:visible').allInnerTexts(),
      inputs: await page.locator('[role=dialog] input:visible').evaluateAll((nodes) =>
        nodes.map((n) => ({ name: n.name, type: n.type, placeholder: n.placeholder }))),
    };
  }
  await page.keyboard.press('Escape');

  // The stored connection's edit form: the URL (with its password) must not be displayed back.
  await page.goto(`${base}/connections`, { waitUntil: 'networkidle', timeout: 120000 });
  const row = page.locator('tr', { hasText: storedId }).first();
  await row.waitFor();
  await row.getByRole('button', { name: /edit/i }).first().click();
  await page.locator('[role=dialog]').first().waitFor();
  await page.getByText('Standard Fields').first().waitFor();
  await page.waitForTimeout(1000);
  const reveal = page.locator('[role=dialog] button[aria-label*="password" i], [role=dialog] input[type=password] ~ * button');
  if (await reveal.count()) await reveal.first().click().catch(() => {});
  await page.locator('[role=dialog]').first().screenshot({ path: `${outDir}/airflow-connection-edit.png` });
  const values = await page.locator('[role=dialog] input, [role=dialog] textarea').evaluateAll((nodes) =>
    nodes.map((n) => n.value));
  const text = await page.locator('[role=dialog]').first().innerText();
  facts.stored = {
    secretInValues: values.some((v) => v.includes(secret)),
    secretInText: text.includes(secret),
    redactedShown: values.some((v) => v.includes('***')),
    html: (await page.content()).includes(secret),
  };
} finally {
  await browser.close();
}
console.log(JSON.stringify(facts));
