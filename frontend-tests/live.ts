// The generated client against a live BFF on RabbitMQ (driven by
// tests/frontend.rs): typed calls, errors by name, an event through the
// subscription helper, and a reconnect after the BFF restarts.
// Protocol with the Rust side: this script prints STEP lines on stdout and
// reads GO lines on stdin when it needs the other side to act.
import { createHmac } from "node:crypto";
import { createServer } from "node:http";
import { createInterface } from "node:readline";
import { BffClient, BffError, type MeshEvent } from "./client.js";

const url = process.env.BFF_URL!;
const token = process.env.BFF_TOKEN!;
const topic = process.env.BFF_TOPIC!;
const secret = process.env.BFF_SECRET!;

/** An HS256 token, as an identity provider would issue it. */
function mint(sub: string, ttlSecs: number): string {
  const part = (o: object) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = part({ alg: "HS256", typ: "JWT" });
  const body = part({ sub, name: sub, roles: ["user"], exp: Math.floor(Date.now() / 1000) + ttlSecs });
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

const lines = createInterface({ input: process.stdin });
const inbox: string[] = [];
let wake: (() => void) | undefined;
lines.on("line", (l) => {
  inbox.push(l);
  wake?.();
});
async function waitFor(expected: string): Promise<void> {
  for (;;) {
    const i = inbox.indexOf(expected);
    if (i >= 0) {
      inbox.splice(i, 1);
      return;
    }
    await new Promise<void>((r) => (wake = r));
  }
}
function step(s: string): void {
  console.log(`STEP ${s}`);
}
function fail(why: string): never {
  console.log(`FAIL ${why}`);
  process.exit(1);
}
function within<T>(ms: number, p: Promise<T>, what: string): Promise<T> {
  return Promise.race([p, new Promise<T>((_, reject) => setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms))]);
}

// A server that refuses the upgrade (a BFF draining, or a proxy in
// trouble): connect fails with ConnectionLost instead of hanging.
const refusing = createServer((_req, res) => {
  res.writeHead(503);
  res.end("draining");
});
await new Promise<void>((r) => refusing.listen(0, "127.0.0.1", r));
const refusingPort = (refusing.address() as { port: number }).port;
const doomed = new BffClient({ url: `ws://127.0.0.1:${refusingPort}/ws`, token: () => token, reconnect: false });
const refused = await within(5000, doomed.connect().then(() => undefined, (e: unknown) => e), "a refused handshake");
if (!(refused instanceof BffError) || refused.name !== "ConnectionLost") fail(`refused handshake: ${String(refused)}`);
refusing.close();
step("a refused handshake fails");

let tokenCalls = 0;
const bff = new BffClient({ url, token: () => ((tokenCalls += 1), token), minReconnectMs: 100, maxReconnectMs: 1000 });
const hello = await bff.connect();
if (hello.user_id !== "ts-user") fail(`hello for ${hello.user_id}`);
step("connected");

const greeting = await bff.api["greeter"]["hello"]<string>({ name: "typescript" });
if (greeting !== "hello typescript") fail(`greeting ${greeting}`);
const sum = await bff.api["calc"]["add"]<number>({ a: 40, b: 2 });
if (sum !== 42) fail(`sum ${sum}`);
step("typed calls resolve");

async function failure(p: Promise<unknown>): Promise<BffError> {
  try {
    await p;
  } catch (e) {
    if (e instanceof BffError) return e;
    fail(`not a BffError: ${String(e)}`);
  }
  fail("resolved instead of failing");
}
const boom = await failure(bff.api["calc"].call("boom"));
if (boom.name !== "NuropbException" || !boom.description.includes("boom from python")) fail(`boom: ${boom.name} ${boom.description}`);
const missing = await failure(bff.request("nowhere", "nothing"));
if (missing.name !== "RouteNotFound") fail(`unknown route: ${missing.name}`);
const forbidden = await failure(bff.subscribeTopic("secret.#", () => undefined));
if (forbidden.name !== "Forbidden") fail(`subscription outside the rules: ${forbidden.name}`);
step("errors are typed");

const events: MeshEvent[] = [];
let arrived: (() => void) | undefined;
await bff.subscribe(`${topic}.#` as never, (e) => {
  events.push(e);
  arrived?.();
});
step("subscribed");
console.log("READY publish");
await within(10000, new Promise<void>((r) => (arrived = r)), "the first event");
if ((events[0]?.event as { n?: number } | null)?.n !== 1) fail(`event ${JSON.stringify(events[0])}`);
step("event arrived");

// Tokens that live 3 s: the client renews each before it expires (an
// authenticate frame), so the gateway never closes with 4001.
let renewals = 0;
const brief = new BffClient({ url, token: () => ((renewals += 1), mint("ts-user", 3)), renewBeforeMs: 2000, reconnect: false });
let briefClosed = 0;
brief.onState((s, code) => {
  if (s === "closed") briefClosed = code ?? -1;
});
await brief.connect();
await new Promise((r) => setTimeout(r, 4500));
if (briefClosed !== 0) fail(`closed with ${briefClosed} although its token was renewed`);
if (renewals < 3) fail(`the token getter was called ${renewals} times in 4.5 s`);
if ((await brief.api["greeter"]["hello"]<string>({ name: "renewed" })) !== "hello renewed") fail("call after renewals");
brief.close();
step("tokens renewed before expiry");

// The BFF restarts: the client reconnects (asking for a token again),
// subscribes again, and calls work.
const reopened = new Promise<void>((resolve) => {
  let closed = false;
  bff.onState((s) => {
    if (s === "closed") closed = true;
    if (s === "open" && closed) resolve();
  });
});
const resumed = new Promise<boolean>((resolve) => bff.onResume(resolve));
const callsBefore = tokenCalls;
const seenBefore = events.length;
console.log("READY restart");
await waitFor("GO restarted");
await within(15000, reopened, "the reconnect");
if (tokenCalls <= callsBefore) fail("the token getter was not asked again");
const again = await bff.api["greeter"]["hello"]<string>({ name: "again" });
if (again !== "hello again") fail(`after restart: ${again}`);
step("reconnected");
// The three events raised while the BFF was down come back, in order,
// from its event log: the resume was recovered.
if (!(await within(10000, resumed, "the resume"))) fail("the resume was not recovered");
const missedEvents = async () => {
  while (events.length < seenBefore + 3) await within(10000, new Promise<void>((r) => (arrived = r)), "the missed events");
  return events.slice(seenBefore).map((e) => (e.event as { n?: number } | null)?.n);
};
const missed = await missedEvents();
if (JSON.stringify(missed) !== "[100,101,102]") fail(`missed events ${JSON.stringify(missed)}`);
if (!events.slice(seenBefore).every((e) => typeof e.position === "number")) fail("events without positions");
step("missed events recovered");
// Give the re-subscription a moment to land, then ask for an event.
await new Promise((r) => setTimeout(r, 300));
console.log("READY publish");
await within(10000, new Promise<void>((r) => (arrived = r)), "an event after the restart");
step("subscription resumed");
bff.close();
console.log("DONE");
process.exit(0);
