// A percept client in grpc-js (another gRPC implementation: pure JavaScript, its own
// HTTP/2), with the API loaded from the .proto files at run time, as a JavaScript user's
// would be. tests/services/test_node_client.py runs it against real servers and checks
// what it prints: one JSON object per run.
//
//   node client.mjs SCENARIO TARGET --protos DIR --google-protos DIR [ARG...]
//
// --protos: protos/ (percept/v1/*.proto); --google-protos: where google/rpc/*.proto are
// (the Python package googleapis-common-protos' folder); protobufjs carries the
// google/protobuf ones they import.
// Scenarios:
//   upscale IMAGE OUT [gzip]  Upscale, the reply's image written to OUT (gzip: the request
//                             sent gzip-compressed)
//   error                     Upscale of bytes that are no image: the status and its
//                             google.rpc details (ErrorInfo, BadRequest)
//   busy IMAGE                one Upscale, expected busy: the status, the pushback
//                             trailer and RetryInfo
//   search IMAGE ID           AddImages (a bidirectional stream: the second item is sent
//                             only once the first one's acknowledgement came back),
//                             then SearchByImage
//   stylize IMAGE STYLE       Stylize with a fixed style, then an unknown style's error
//   tls IMAGE CA [CERT KEY]   Upscale over TLS (Node's OpenSSL), verifying the server with
//                             the CA, with a client certificate where given (mutual TLS):
//                             the reply's size, or the failure
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const { values: flags, positionals } = parseArgs({
  allowPositionals: true,
  options: { protos: { type: "string" }, "google-protos": { type: "string" } },
});
const [scenario, target, ...rest] = positionals;
const MIB = 1024 * 1024;

const definition = protoLoader.loadSync(
  ["percept/v1/superres.proto", "percept/v1/style.proto", "percept/v1/search.proto"],
  { includeDirs: [flags.protos, flags["google-protos"]], keepCase: true, longs: Number,
    enums: String, defaults: true },
);
const api = grpc.loadPackageDefinition(definition).percept.v1;

// google.rpc.Status and the detail messages, to read the grpc-status-details-bin trailer
const rpc = new protobuf.Root();
rpc.resolvePath = (_origin, target) => path.join(flags["google-protos"], target);
rpc.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
const Status = rpc.lookupType("google.rpc.Status");

function details(error) {
  const raw = error.metadata?.get("grpc-status-details-bin")?.[0];
  if (!raw) return null;
  const status = Status.decode(raw);
  const out = { code: status.code, message: status.message, details: {} };
  for (const any of status.details) {
    const name = any.type_url.split("/").pop();
    let type = null;
    try {
      type = rpc.lookupType(name);
    } catch {
      out.details[name] = { undecoded: any.value.length };  // a type this client lacks
      continue;
    }
    out.details[name] = type.toObject(type.decode(any.value), { longs: Number,
                                                                defaults: true });
  }
  return out;
}

function failure(error) {
  return {
    code: grpc.status[error.code],
    message: error.details,
    pushback_ms: error.metadata?.get("grpc-retry-pushback-ms")?.[0] ?? null,
    request_id: error.metadata?.get("x-request-id")?.[0] ?? null,
    status: details(error),
  };
}

function unary(client, method, request, deadlineSeconds = 120) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + deadlineSeconds * 1000);
    client[method](request, { deadline }, (error, reply) =>
      error ? reject(error) : resolve(reply));
  });
}

function channelOptions(extra = {}) {
  // grpc-js refuses replies over 4 MiB by default, as every gRPC client does
  return { "grpc.max_receive_message_length": 64 * MIB, ...extra };
}

async function upscale(image, out, compression) {
  const options = compression === "gzip"
    ? channelOptions({ "grpc.default_compression_algorithm": 2 }) : channelOptions();
  const client = new api.SuperResolution(target, grpc.credentials.createInsecure(), options);
  const reply = await unary(client, "Upscale", { image: readFileSync(image) });
  writeFileSync(out, reply.image);
  return { width: reply.width, height: reply.height, model: reply.model,
           bytes: reply.image.length };
}

async function expectFailure(call) {
  try {
    await call();
  } catch (error) {
    return failure(error);
  }
  return { code: "OK" };
}

async function error() {
  const client = new api.SuperResolution(target, grpc.credentials.createInsecure(),
                                         channelOptions());
  return expectFailure(() => unary(client, "Upscale", { image: Buffer.from("not an image") }));
}

async function busy(image) {
  const client = new api.SuperResolution(target, grpc.credentials.createInsecure(),
                                         channelOptions());
  return expectFailure(() => unary(client, "Upscale", { image: readFileSync(image) }));
}

async function search(image, id) {
  const client = new api.ImageSearch(target, grpc.credentials.createInsecure(),
                                     channelOptions());
  const acks = await new Promise((resolve, reject) => {
    const stream = client.AddImages({ deadline: new Date(Date.now() + 120_000) });
    const received = [];
    stream.on("data", (ack) => {
      received.push({ added: ack.added, rejected: ack.rejected });
      if (received.length === 1) {  // the first item is acknowledged: send the next
        stream.write({ id: `${id}-broken`, image: Buffer.from("broken") });
        stream.end();
      }
    });
    stream.on("error", reject);
    stream.on("end", () => resolve(received));
    stream.write({ id, uri: `file:///${id}`, image: readFileSync(image) });
  });
  const found = await unary(client, "SearchByImage", { image: readFileSync(image), k: 1 });
  return { acks, hits: found.hits.map((hit) => ({ id: hit.id, uri: hit.uri,
                                                  score: hit.score })) };
}

async function stylize(image, style) {
  const client = new api.StyleTransfer(target, grpc.credentials.createInsecure(),
                                       channelOptions());
  const reply = await unary(client, "Stylize", { image: readFileSync(image), style,
                                                 strength: 0.5 });
  const unknown = await expectFailure(() => unary(client, "Stylize", {
    image: readFileSync(image), style: "no-such-style" }));
  return { bytes: reply.image.length, width: reply.width, height: reply.height,
           model: reply.model, unknown };
}

async function tls(image, ca, cert, key) {
  const credentials = grpc.credentials.createSsl(
    readFileSync(ca), key ? readFileSync(key) : null, cert ? readFileSync(cert) : null);
  const client = new api.SuperResolution(target, credentials, channelOptions());
  try {
    const reply = await unary(client, "Upscale", { image: readFileSync(image) }, 60);
    return { code: "OK", width: reply.width, height: reply.height };
  } catch (error) {
    return failure(error);
  }
}

const scenarios = { upscale, error, busy, search, stylize, tls };
if (!scenarios[scenario]) {
  console.error(`unknown scenario ${scenario}; one of ${Object.keys(scenarios).join(", ")}`);
  process.exit(2);
}
try {
  console.log(JSON.stringify(await scenarios[scenario](...rest)));
  process.exit(0);
} catch (error) {
  console.error(error.stack ?? String(error));
  process.exit(1);
}
