// The "Singleton locks" page in a real browser (headless Chromium, playwright-core), logged in through Airflow.
//
// LOCKS_USER=admin LOCKS_PASSWORD=admin node locks.mjs BASE_URL OUT_DIR LOCK_NAME REASON TASK_QUERY
// Prints one JSON object of facts; the pytest test asserts on them. Screenshots go to OUT_DIR.
import { chromium } from 'playwright-core';

const [base, outDir, lockName, reason, taskQuery] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
const facts = {};
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 800 } });
  page.setDefaultTimeout(60000);

  // Airflow's own login form (simple auth manager); the session cookie then authorizes the page's calls.
  await page.goto(`${base}/`, { waitUntil: 'networkidle', timeout: 120000 });
  await page.locator('input[name=username]').fill(process.env.LOCKS_USER);
  await page.locator('input[name=password]').fill(process.env.LOCKS_PASSWORD);
  await page.keyboard.press('Enter');
  await page.waitForURL((url) => !url.pathname.includes('login'), { timeout: 60000 });

  // A task instance's tab: the page filtered to that task, its lock highlighted.
  await page.goto(`${base}/singleton/locks?${taskQuery}`, { waitUntil: 'networkidle' });
  await page.locator('#status').filter({ hasText: /lock\(s\)|Not logged|Forbidden/ }).waitFor();
  facts.taskTab = {
    status: await page.locator('#status').innerText(),
    highlighted: await page.locator(`tr.mine[data-name="${lockName}"]`).count(),
  };

  // Admin > Singleton locks, inside the Airflow UI's frame.
  await page.goto(`${base}/plugin/singleton_locks`, { waitUntil: 'networkidle' });
  const frame = page.frameLocator('iframe[title="Singleton locks"]');
  const row = frame.locator(`tr[data-name="${lockName}"]`);
  await row.waitFor();
  facts.listed = await row.innerText();
  await page.screenshot({ path: `${outDir}/airflow-locks-page.png` });
  await row.getByRole('button', { name: /Release/ }).click();
  await frame.locator('#release-reason').fill(reason);
  await page.screenshot({ path: `${outDir}/airflow-locks-release-dialog.png` });
  await frame.locator('#release-confirm').click();
  await frame.locator('#status').filter({ hasText: /Released|Not released/ }).waitFor();
  facts.released = await frame.locator('#status').innerText();
  facts.rowsAfter = await frame.locator(`tr[data-name="${lockName}"]`).count();
  await page.screenshot({ path: `${outDir}/airflow-locks-released.png` });
} finally {
  await browser.close();
}
console.log(JSON.stringify(facts));
