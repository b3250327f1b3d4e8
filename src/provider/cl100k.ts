import { createRequire } from 'node:module';

type Cl100k = typeof import('gpt-tokenizer/encoding/cl100k_base');
let cl100kLoaded: Cl100k | undefined;

/**
 * cl100k, loaded on the first count: its ranks cost ~0.1 s and ~40 MB to
 * load, and a run that needs no count (tokens.ts) never loads it.
 * Synchronous, so counting stays a plain call: the package's CommonJS
 * build, through require.
 *
 * A run counts on its own thread (tokens.ts, token-thread.ts). The main
 * thread counts here only where an answer is already in hand: an input the
 * provider refused, a request whose answer broke the contract (for what it
 * billed), and when the counting thread has failed (src/worker/batch.ts).
 */
function cl100k(): Cl100k {
  if (!cl100kLoaded) {
    cl100kLoaded = createRequire(import.meta.url)('gpt-tokenizer/encoding/cl100k_base') as Cl100k;
    // Its merge cache keeps 100,000 pieces of text by default, and with them
    // the texts they came from: counting the corpus's long emails ten times
    // over, the counting thread's heap reached 229-237 MiB with it and 63-64
    // MiB with 5,000, for 30-35% more time a count (BENCHMARKS.md, "twelfth pass").
    cl100kLoaded.setMergeCacheSize(MERGE_CACHE_ENTRIES);
  }
  return cl100kLoaded;
}

const MERGE_CACHE_ENTRIES = 5000;

// Text like '<|endoftext|>' in an email is ordinary text to the embeddings API;
// gpt-tokenizer throws on it by default.
const PLAIN_TEXT = { disallowedSpecial: new Set<string>() };

/**
 * Token counts with cl100k, the encoding of every OpenAI embedding model.
 * For other models it is an estimate: the provider's own 400 is still handled.
 */
export function tokenCount(text: string): number {
  return cl100k().countTokens(text, PLAIN_TEXT);
}

/**
 * `text`'s count when it is at most `limit` tokens; undefined once it is
 * over, counting no further: the corpus's 694 emails longer than 8,192
 * bytes took 2.5 s to check this way against 3.9 s to count in full: the
 * 181 over the limit hold 2.8 M of their 4.9 M tokens (a median of 10,773,
 * at most 161,284).
 */
export function tokenCountWithin(text: string, limit: number): number | undefined {
  const within = cl100k().isWithinTokenLimit(text, limit, PLAIN_TEXT);
  return within === false ? undefined : within;
}

function fits(text: string, maxTokens: number): boolean {
  return cl100k().isWithinTokenLimit(text, maxTokens, PLAIN_TEXT) !== false;
}

/**
 * The longest prefix of `text` (in whole code points) that is at most
 * `maxTokens` tokens, for --truncate.
 *
 * Not decode(encode(text).slice(0, n)): a token boundary can fall inside a
 * multi-byte character, and gpt-tokenizer's decode shares one streaming
 * TextDecoder across calls, so the cut bytes turn into U+FFFD here and leak
 * into the next decode of an unrelated text. The result would neither be a
 * prefix nor stay within the limit. Searching on the string side avoids both.
 */
export function truncateToTokens(text: string, maxTokens: number): string {
  if (maxTokens <= 0) return '';
  if (fits(text, maxTokens)) return text;
  // Grow from a typical chars-per-token guess so a huge text is not re-tokenised
  // in full on every probe; `hi` never fits, `lo` always does.
  let lo = 0;
  let hi = Math.min(text.length, maxTokens * 4);
  while (hi < text.length && fits(text.slice(0, hi), maxTokens)) {
    lo = hi;
    hi = Math.min(text.length, hi * 2);
  }
  while (hi - lo > 1) {
    const mid = (lo + hi) >>> 1;
    if (fits(text.slice(0, mid), maxTokens)) lo = mid;
    else hi = mid;
  }
  // A cut between the halves of a surrogate pair would leave a lone surrogate,
  // which is sent as U+FFFD.
  const last = text.charCodeAt(lo - 1);
  if (lo > 0 && last >= 0xd800 && last <= 0xdbff) lo--;
  return text.slice(0, lo);
}

/**
 * `text` cut to its first `limit` tokens, and the cut's count, for
 * --truncate. Counted again after the cut: a boundary can shift when the
 * prefix is encoded alone, so it shrinks until it fits.
 */
export function truncateWithin(text: string, limit: number): { text: string; tokens: number } {
  let keep = limit;
  let cut = truncateToTokens(text, keep);
  let tokens = tokenCount(cut);
  while (tokens > limit && keep > 1) {
    keep -= tokens - limit;
    cut = truncateToTokens(text, keep);
    tokens = tokenCount(cut);
  }
  return { text: cut, tokens };
}
