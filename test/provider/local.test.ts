import { describe, expect, it } from 'vitest';
import { createLocalProvider } from '../../src/provider/local.js';

function cosine(a: Float32Array, b: Float32Array): number {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += (a[i] as number) * (b[i] as number);
    na += (a[i] as number) ** 2;
    nb += (b[i] as number) ** 2;
  }
  return dot / Math.sqrt(na * nb);
}

describe('the local provider', () => {
  it('embeds offline into 512 finite dimensions, placing related texts closer than unrelated ones', async () => {
    const provider = await createLocalProvider();
    const { vectors } = await provider.embed([
      'Cheap meds online, buy viagra now with no prescription',
      'Discount pharmacy: order pills today, no doctor needed',
      'The quarterly board meeting is moved to Thursday at 10am',
    ]);
    expect(vectors).toHaveLength(3);
    for (const v of vectors) {
      expect(v).toHaveLength(512);
      expect(v.every(Number.isFinite)).toBe(true);
    }
    const [spamA, spamB, work] = vectors as [Float32Array, Float32Array, Float32Array];
    expect(cosine(spamA, spamB)).toBeGreaterThan(cosine(spamA, work) + 0.1);
    // Deterministic: the same text gives the same vector.
    const again = await provider.embed([
      'The quarterly board meeting is moved to Thursday at 10am',
    ]);
    expect(Array.from(again.vectors[0] as Float32Array)).toEqual(Array.from(work));
  }, 60_000);
});
