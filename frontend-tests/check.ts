// Type-level checks of a generated client.ts (compiled with tsc --strict,
// never run): what must compile does, and each @ts-expect-error line must
// be an error, or tsc fails with "unused @ts-expect-error".
import { BffClient, BffError, CloseCode, createApi, EventRules, type Caller, type ErrorName, type ServerFrame } from "./client";

declare const bff: BffClient;

export async function checks(): Promise<void> {
  // Aliased routes under their exposed names, typed from nuropb_describe.
  const greeting: string = await bff.api["greeter"]["hello"]<string>({ name: "ts" });
  // @ts-expect-error `name` is a string
  await bff.api["greeter"]["hello"]({ name: 42 });
  // @ts-expect-error `name` is required
  await bff.api["greeter"]["hello"]({});
  // A wildcard route: described methods by name, the rest through call.
  await bff.api["calc"]["add"]({ a: 1, b: 2 });
  await bff.api["calc"].call("anything", {});
  // A composed route resolves with an object of its parts.
  const home: Record<string, unknown> = await bff.api["home"]["load"]();
  // @ts-expect-error the mesh name of an aliased service is not exposed
  bff.api["interop"];
  // Subscriptions: the rules' patterns only (subscribeTopic takes any).
  await bff.subscribe("news.#", (e) => void e.topic);
  // @ts-expect-error not a subscribers rule
  await bff.subscribe("alerts.*", () => undefined);
  await bff.subscribeTopic("news.sport.#", () => undefined);
  const code: number = CloseCode.TOKEN_EXPIRED;
  const rule: string = EventRules[0].topic;
  try {
    await bff.request("x", "y");
  } catch (e) {
    if (e instanceof BffError) {
      const name: ErrorName = e.name;
      if (name === "RouteNotFound" || name === "NuropbException" || name === "ConnectionLost") void name;
    }
  }
  const frame = {} as ServerFrame;
  if (frame.type === "response") {
    const traceId: string = frame.payload.trace_id;
    void traceId;
  }
  // The browser's own WebSocket can be passed explicitly.
  const explicit = new BffClient({ url: "ws://127.0.0.1/ws", WebSocket, reconnect: false });
  void explicit;
  const caller: Caller = bff;
  void createApi(caller);
  void greeting, home, code, rule;
}
