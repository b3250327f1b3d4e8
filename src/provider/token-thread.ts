import { parentPort } from 'node:worker_threads';
import { tokenCount, truncateWithin } from './cl100k.js';

/**
 * The counting thread (see tokens.ts). It answers each request in the
 * order it came: `{ id, texts }` with each text's cl100k count, `{ id,
 * truncate, limit }` with the text cut to `limit` tokens and its count.
 * cl100k loads on the first request, here and never on the main thread.
 */
export type CountRequest =
  | { id: number; texts: string[] }
  | { id: number; truncate: string; limit: number };

export type CountAnswer =
  | { id: number; counts: number[] }
  | { id: number; text: string; tokens: number }
  | { id: number; error: string };

const port = parentPort;
if (!port) throw new Error('token-thread runs as a worker thread of tokens.ts');

port.on('message', (request: CountRequest) => {
  let answer: CountAnswer;
  try {
    answer =
      'texts' in request
        ? { id: request.id, counts: request.texts.map(tokenCount) }
        : { id: request.id, ...truncateWithin(request.truncate, request.limit) };
  } catch (error) {
    answer = { id: request.id, error: error instanceof Error ? error.message : String(error) };
  }
  port.postMessage(answer);
});
