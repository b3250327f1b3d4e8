/**
 * Characters a terminal acts on instead of printing: C0 controls (ESC starts
 * colours, cursor moves, OSC 8 links and title changes; BEL, BS and CR
 * rewrite what is shown; newline and tab too, so one record stays one line),
 * DEL, C1 controls (U+0080 to U+009F: 8-bit CSI and OSC), the bidi controls
 * that reorder what follows (U+061C, U+200E, U+200F, U+202A to U+202E,
 * U+2066 to U+2069), and the line and paragraph separators U+2028, U+2029.
 */
const UNSAFE =
  // biome-ignore lint/suspicious/noControlCharactersInRegex: finding control characters is the point
  /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]/g;

/**
 * Text from the database (or anyone else) made safe to print on a terminal:
 * every character in UNSAFE is written as its escape, `\x1b` for code points
 * up to U+00FF and `\u202e` above, so the reader sees it and the terminal
 * does not act on it. Everything else, backslashes included, is unchanged.
 * For human output only: JSON output keeps the exact text.
 */
export function terminalSafe(text: string): string {
  return text.replace(UNSAFE, (c) => {
    const code = c.charCodeAt(0);
    return code <= 0xff
      ? `\\x${code.toString(16).padStart(2, '0')}`
      : `\\u${code.toString(16).padStart(4, '0')}`;
  });
}
