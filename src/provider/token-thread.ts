import { parentPort } from 'node:worker_threads';
import { tokenCount, tokenCountWithin, truncateWithin } from './cl100k.js';

/**
 * The counting thread (see tokens.ts). It answers each request in the
 * order it came: `{ id, texts }` with each text's cl100k count (with a
 * `limit`, null for a text over it, counted no further), `{ id, truncate,
 * limit }` with the text cut to `limit` tokens and its count.
 * cl100k loads on the first request, here and never on the main thread.
 */
export type CountQuery =
  | { texts: readonly string[]; limit?: number }
  | { truncate: string; limit: number };
export type CountRequest = CountQuery & { id: number };

export type CountAnswer =
  | { id: number; counts: Array<number | null> }
  | { id: number; text: string; tokens: number }
  | { id: number; error: string };

const port = parentPort;
if (!port) throw new Error('token-thread runs as a worker thread of tokens.ts');

function countOf(text: string, limit: number | undefined): number | null {
  return limit === undefined ? tokenCount(text) : (tokenCountWithin(text, limit) ?? null);
}

port.on('message', (request: CountRequest) => {
  let answer: CountAnswer;
  try {
    answer =
      'texts' in request
        ? { id: request.id, counts: request.texts.map((text) => countOf(text, request.limit)) }
        : { id: request.id, ...truncateWithin(request.truncate, request.limit) };
  } catch (error) {
    answer = { id: request.id, error: error instanceof Error ? error.message : String(error) };
  }
  port.postMessage(answer);
});
