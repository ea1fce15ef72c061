// Opens a page in headless Chromium (playwright-core driving Debian's chromium),
// waits until the page sets window.__done, and prints one JSON line: what the
// page reported, its console errors and every request it made.
// Usage: node run.cjs <page url> <chromium path>
const { chromium } = require("playwright-core");

(async () => {
  const [url, executablePath] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath, headless: true, args: ["--no-sandbox"] });
  const out = { requests: [], errors: [], result: null };
  try {
    const page = await browser.newPage();
    page.on("request", (r) => out.requests.push(`${r.method()} ${r.url()}`));
    page.on("console", (m) => { if (m.type() === "error") out.errors.push(m.text()); });
    page.on("pageerror", (e) => out.errors.push(String(e)));
    await page.goto(url);
    await page.waitForFunction(() => window.__done === true, null, { timeout: 30000 });
    out.result = await page.evaluate(() => window.__result);
  } catch (e) {
    out.errors.push(String(e));
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(out) + "\n");
})();
