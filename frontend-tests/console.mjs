// The console page of a development-mode BFF in headless chromium (driven
// by tests/frontend.rs): the page connects with its prefilled token, sends a
// request, subscribes, and shows the response and an event in its log. A
// screenshot is kept. Prints READY lines and reads GO lines like live.ts.
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const [url, screenshot] = [process.env.BFF_CONSOLE_URL, process.env.BFF_SCREENSHOT];
const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const lines = createInterface({ input: process.stdin });
const inbox = [];
let wake;
lines.on("line", (l) => { inbox.push(l); wake?.(); });
const waitFor = async (expected) => {
  for (;;) {
    const i = inbox.indexOf(expected);
    if (i >= 0) { inbox.splice(i, 1); return; }
    await new Promise((r) => (wake = r));
  }
};

const browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-gpu"] });
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.locator("#status.open").waitFor({ timeout: 10000 });
  console.log("STEP connected");
  await page.locator("tr.route", { hasText: "echo.greet" }).first().click();
  await page.fill("#params", JSON.stringify({ name: "console" }));
  await page.click("#send");
  await page.locator("#log .in", { hasText: "<- response" }).filter({ hasText: "\"console\"" }).waitFor({ timeout: 10000 });
  console.log("STEP response");
  await page.locator("tr.rule", { hasText: "news.#" }).click();
  await page.click("#subscribe");
  await page.locator("#log .in", { hasText: "<- subscribed" }).waitFor({ timeout: 10000 });
  console.log("READY publish");
  await waitFor("GO published");
  await page.locator("#log .in", { hasText: "news.today" }).waitFor({ timeout: 10000 });
  console.log("STEP event");
  await page.screenshot({ path: screenshot, fullPage: true });

  // The typed client in the page: it resumes after its socket drops, and
  // the events raised meanwhile come back in order.
  const clientJs = readFileSync(process.env.BFF_CLIENT_JS, "utf8");
  await page.addScriptTag({ type: "module", content: `${clientJs}\nwindow.BffClient = BffClient;` });
  await page.waitForFunction(() => window.BffClient !== undefined, null, { timeout: 10000 });
  await page.evaluate(async (wsUrl) => {
    const token = document.querySelector("#token").value;
    const bff = new window.BffClient({ url: wsUrl, token: () => token, minReconnectMs: 300, maxReconnectMs: 600 });
    window.seen = [];
    window.resumes = [];
    bff.onResume((recovered) => window.resumes.push(recovered));
    await bff.connect();
    await bff.subscribeTopic("news.#", (e) => window.seen.push(e.event.n));
    window.typed = bff;
  }, process.env.BFF_WS_URL);
  console.log("READY news");
  await waitFor("GO published");
  await page.waitForFunction(() => window.seen.length === 1, null, { timeout: 10000 });
  console.log("READY drop");
  await waitFor("GO dropped");
  await page.waitForFunction(() => window.resumes.length === 1 && window.seen.length === 4, null, { timeout: 15000 });
  const [seen, resumes] = await page.evaluate(() => [window.seen, window.resumes]);
  if (JSON.stringify(seen) !== "[1,2,3,4]" || JSON.stringify(resumes) !== "[true]") {
    console.log(`FAIL after the drop: events ${JSON.stringify(seen)}, resumes ${JSON.stringify(resumes)}`);
    process.exit(1);
  }
  console.log("STEP the client resumed in the browser");
  if (errors.length) { console.log(`FAIL page errors: ${errors.join("; ")}`); process.exit(1); }
  console.log("DONE");
} finally {
  await browser.close();
}
process.exit(0);
