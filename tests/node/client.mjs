// The `ai` package's own chat client against the gateway, for tests/api/aisdk (driven from pytest).
//
//   node client.mjs '<command as JSON>'
//
// Commands: {"do": "send", api, headers, chatId, messages, trigger?, messageId?, body?, abortAfterFirstDelta?}
//           {"do": "reconnect", api, headers, chatId}
//           {"do": "validate", url, headers}
// Prints one JSON object a line: {"event": "connected"} once a stream is open, {"event": "chunk", chunk}
// for every UI message chunk as the transport parsed it, then {"event": "result", ...}.
import { DefaultChatTransport, readUIMessageStream, validateUIMessages } from 'ai';

const command = JSON.parse(process.argv[2]);
const out = (line) => process.stdout.write(JSON.stringify(line) + '\n');

async function read(stream, controller) {
  const chunks = [];
  const errors = [];
  let aborted = false;
  const recorded = stream.pipeThrough(new TransformStream({
    transform(chunk, next) {
      chunks.push(chunk);
      out({ event: 'chunk', chunk });
      next.enqueue(chunk);
      if (command.abortAfterFirstDelta && chunk.type === 'text-delta' && !aborted) {
        aborted = true;
        controller.abort();
      }
    },
  }));
  let message = null;
  try {
    for await (const snapshot of readUIMessageStream({ stream: recorded, onError: (e) => errors.push(e.message) })) {
      message = snapshot;
    }
  } catch (e) {
    errors.push(e.name);
  }
  return { message, chunks, errors, aborted };
}

async function main() {
  const transport = new DefaultChatTransport({ api: command.api, headers: command.headers });
  const controller = new AbortController();
  if (command.do === 'send') {
    const stream = await transport.sendMessages({
      chatId: command.chatId, messages: command.messages, trigger: command.trigger ?? 'submit-message',
      messageId: command.messageId, body: command.body, abortSignal: controller.signal,
    });
    out({ event: 'connected' });
    out({ event: 'result', ...await read(stream, controller) });
  } else if (command.do === 'reconnect') {
    const stream = await transport.reconnectToStream({ chatId: command.chatId, abortSignal: controller.signal });
    if (stream === null) {
      out({ event: 'result', none: true });
      return;
    }
    out({ event: 'connected' });
    out({ event: 'result', ...await read(stream, controller) });
  } else if (command.do === 'validate') {
    const response = await fetch(command.url, { headers: command.headers });
    const messages = await response.json();
    out({ event: 'result', status: response.status, messages: await validateUIMessages({ messages }) });
  } else {
    throw new Error(`unknown command ${command.do}`);
  }
}

main().catch((e) => {
  out({ event: 'failed', name: e.name, message: e.message, statusCode: e.statusCode ?? null });
  process.exitCode = 1;
});
