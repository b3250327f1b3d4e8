import { describe, expect, it } from 'vitest';
import { tokenCount, truncateToTokens } from '../../src/provider/cl100k.js';

describe('tokenCount', () => {
  // Reference counts from OpenAI's tiktoken for cl100k_base.
  it.for([
    { text: '', tokens: 0 },
    { text: 'hello world', tokens: 2 },
    { text: 'tiktoken is great!', tokens: 6 },
    { text: 'antidisestablishmentarianism', tokens: 6 },
    { text: '2 + 2 = 4', tokens: 7 },
    { text: 'お誕生日おめでとう', tokens: 9 },
  ])('counts $text as $tokens cl100k tokens', ({ text, tokens }) => {
    expect(tokenCount(text)).toBe(tokens);
  });

  it('counts <|endoftext|> as the plain text the embeddings API sees, without throwing', () => {
    // As a special token it would be 1; as text it is "<", "|", "endo", "ft", "ext", "|", ">".
    expect(tokenCount('<|endoftext|>')).toBe(7);
    expect(tokenCount('an email quoting <|endoftext|> and <|im_start|>')).toBeGreaterThan(10);
  });
});

describe('truncateToTokens', () => {
  const samples = [
    'The quick brown fox jumps over the lazy dog, again and again, until it tires.',
    '😀😀😀😀 héllo 日本語のテキスト🎉🎉',
    '日本語のテキストです。お誕生日おめでとう',
    'Ünïcödé 🧑‍🤝‍🧑 family <|endoftext|> tail',
  ];

  it.for(samples)('every cut of %j is a real prefix within the token limit', (text) => {
    const total = tokenCount(text);
    for (let n = 1; n < total; n++) {
      const cut = truncateToTokens(text, n);
      expect(tokenCount(cut), `n=${n}: ${JSON.stringify(cut)}`).toBeLessThanOrEqual(n);
      expect(text.startsWith(cut), `n=${n}: ${JSON.stringify(cut)}`).toBe(true);
      expect(cut).not.toContain('\uFFFD');
      // Maximal: one more code point would not fit.
      const next = String.fromCodePoint(text.codePointAt(cut.length)!);
      expect(tokenCount(cut + next), `n=${n}`).toBeGreaterThan(n);
    }
  });

  it('a cut inside a multi-byte character does not garble the next, unrelated truncation', () => {
    // 😀 is two tokens, so one token ends mid-character.
    expect(truncateToTokens('😀😀', 1)).toBe('');
    expect(truncateToTokens('日本語のテキスト', 3)).toBe('日本');
  });

  it('returns text already within the limit unchanged', () => {
    expect(truncateToTokens('hello world', 2)).toBe('hello world');
    expect(truncateToTokens('hello world', 100)).toBe('hello world');
    expect(truncateToTokens('', 5)).toBe('');
  });

  it('a limit of zero leaves nothing', () => {
    expect(truncateToTokens('hello world', 0)).toBe('');
  });

  it('cuts a megabyte of text to 8192 tokens', () => {
    const text = 'lorem ipsum dolor sit amet '.repeat(40_000);
    const cut = truncateToTokens(text, 8192);
    expect(tokenCount(cut)).toBeLessThanOrEqual(8192);
    expect(tokenCount(cut)).toBeGreaterThan(8180);
    expect(text.startsWith(cut)).toBe(true);
  });
});
