import { randomInt } from 'node:crypto';

/**
 * The seed of a random schedule: PGEMBED_TEST_SEED replays one that failed;
 * by default a fresh one, which the test prints.
 */
export function testSeed(): number {
  const given = process.env.PGEMBED_TEST_SEED;
  if (given === undefined || given === '') return randomInt(2 ** 31);
  const seed = Number(given);
  if (!Number.isSafeInteger(seed)) {
    throw new Error(`PGEMBED_TEST_SEED must be an integer, not ${given}`);
  }
  return seed;
}

/** A small seeded PRNG, so a failing schedule can be replayed from its seed. */
export function mulberry32(seed: number): () => number {
  let a = seed;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
