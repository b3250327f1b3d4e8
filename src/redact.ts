/**
 * One place that makes text safe to show or store: every message, log line,
 * run row and manifest goes through here before it leaves the process.
 *
 * - A URL keeps its scheme, host, port, path and query keys; its user-info
 *   (user name and password), every query value and the fragment become `***`:
 *   `https://***@proxy.example/v1?api-key=***`.
 * - In free text, every URL is redacted so, and so is the value of any
 *   `?key=value` / `&key=value` pair (a URL quoted without its scheme, as in
 *   `POST /v1?api-key=…`) and of `password=…`-like pairs (libpq DSNs).
 * - Known secret values are also replaced wherever they appear verbatim: the
 *   API key (6 characters or more) and a settings URL as a whole, always; a
 *   password (a URL's, PGPASSWORD), a query value under a key that sounds
 *   secret (`api-key`, `token`, `sig`…) and a fragment only when specific
 *   enough to be no ordinary word (see isSpecific): `postgres:postgres` or
 *   `?api-version=2024-02-01` are redacted inside URLs, not through all text.
 * - A JSON line (the log) is redacted inside its string values only, so it
 *   stays JSON.
 */

const REDACTED = '***';

/**
 * Known secrets shorter than this are not searched for verbatim: they would
 * mangle ordinary words. Inside URLs they are redacted all the same.
 */
const MIN_VERBATIM_LENGTH = 6;

/**
 * A password, or a secret taken from a URL, is searched for verbatim only
 * from this length on (and only if isSpecific): shorter ones are too often
 * ordinary words (`pgembed`, `secret`).
 */
const MIN_PASSWORD_LENGTH = 8;

/**
 * Words that pgembed's own output is full of: a password equal to one of them
 * (a default like `postgres` or `password`) is redacted inside URLs only.
 */
const COMMON_WORDS = new Set(['postgres', 'postgresql', 'password', 'pgembed', 'pgvector']);

/** Settings whose whole value is a secret. */
const SECRET_ENV = ['OPENAI_API_KEY', 'PGPASSWORD'] as const;
/** Settings whose value is a URL that may carry secrets. */
const URL_ENV = ['OPENAI_BASE_URL', 'DATABASE_URL'] as const;
/** libpq settings naming what PGPASSWORD logs in to: ordinary words, not secrets. */
const PG_NAME_ENV = ['PGUSER', 'PGDATABASE', 'PGHOST'] as const;

/**
 * Query keys whose values are secret (normalised: lower case, without `-`,
 * `_` and `.`): those values are hunted verbatim through all text. Every other
 * query value (`api-version=2024-02-01`, `sslmode=require`) is `***` inside a
 * URL but left alone elsewhere.
 */
const SECRET_QUERY_KEYS = new Set([
  'key',
  'apikey',
  'token',
  'accesstoken',
  'secret',
  'clientsecret',
  'password',
  'sslpassword',
  'passwd',
  'pwd',
  'pass',
  'sig',
  'signature',
  'auth',
  'authorization',
  'credential',
  'credentials',
  'code',
  'sas',
  'jwt',
  'session',
  'sessionid',
  'privatekey',
]);
/** …and any key ending so (`x-api-key`, `subscription-key`, `refresh_token`). */
const SECRET_QUERY_KEY_END = /(?:apikey|subscriptionkey|token|secret|password|passwd|signature)$/;

function isSecretQueryKey(key: string): boolean {
  const normal = safeDecode(key)
    .toLowerCase()
    .replace(/[-_.\s]/g, '');
  return SECRET_QUERY_KEYS.has(normal) || SECRET_QUERY_KEY_END.test(normal);
}

// A URL with an authority (`scheme://`), up to whitespace, a quote, a
// backslash (an escape in JSON) or an angle bracket.
const URL_IN_TEXT = /(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*:\/\/[^\s'"`<>\\]+/gi;
// `?key=value` or `&key=value` glued to something before it (a path, a URL).
const QUERY_PAIR = /(?<=\S)([?&][\w.~%+-]+=)(?!\*\*\*)([^\s&#'"`<>\\)]+)/g;
// `password=…` and the like, as in a libpq DSN or a form body.
const SECRET_PAIR =
  /(?<![\w-])((?:ssl)?password|passwd|pwd|secret|token|access[-_]?token|api[-_]?key|apikey)=(?!\*\*\*)([^\s&#'"`<>\\),;]+)/gi;

/**
 * A URL made safe to show or store. Anything that is not a `scheme://` URL is
 * returned as it is.
 */
export function redactUrl(url: string): string {
  const parts = splitUrl(url);
  if (!parts) return url;
  const { scheme, userInfo, hostAndPath, query, fragment } = parts;
  const redactedQuery =
    query === undefined
      ? ''
      : `?${query
          .split('&')
          .map((pair) => {
            const eq = pair.indexOf('=');
            if (eq < 0) return pair === '' ? '' : REDACTED;
            return eq === pair.length - 1 ? pair : `${pair.slice(0, eq + 1)}${REDACTED}`;
          })
          .join('&')}`;
  return [
    scheme,
    userInfo === undefined ? '' : `${REDACTED}@`,
    hostAndPath,
    redactedQuery,
    fragment === undefined ? '' : fragment === '' ? '#' : `#${REDACTED}`,
  ].join('');
}

interface UrlParts {
  scheme: string; // with the `://`
  userInfo: string | undefined;
  hostAndPath: string;
  query: string | undefined; // without the `?`
  fragment: string | undefined; // without the `#`
}

/** Splits by hand, so a URL that `new URL` refuses (a bad port, a space) is still redacted. */
function splitUrl(url: string): UrlParts | undefined {
  const head = /^[a-z][a-z0-9+.-]*:\/\//i.exec(url);
  if (!head) return undefined;
  let rest = url.slice(head[0].length);
  let fragment: string | undefined;
  let query: string | undefined;
  const hash = rest.indexOf('#');
  if (hash >= 0) {
    fragment = rest.slice(hash + 1);
    rest = rest.slice(0, hash);
  }
  const question = rest.indexOf('?');
  if (question >= 0) {
    query = rest.slice(question + 1);
    rest = rest.slice(0, question);
  }
  // The authority ends at the first `/`; its user-info at its last `@`.
  const slash = rest.indexOf('/');
  const authority = slash >= 0 ? rest.slice(0, slash) : rest;
  const at = authority.lastIndexOf('@');
  return {
    scheme: head[0],
    userInfo: at >= 0 ? authority.slice(0, at) : undefined,
    hostAndPath: at >= 0 ? rest.slice(at + 1) : rest,
    query,
    fragment,
  };
}

/** Needles to look for verbatim and what replaces each, longest first. */
type Needles = ReadonlyArray<readonly [needle: string, replacement: string]>;

/**
 * What secretsOfSettings knows about the list it returned: which plain values
 * are passwords (PGPASSWORD) and the ordinary words around them (the user,
 * database and host they log in to). Kept beside the list, so that the list
 * itself stays plain strings; a copy of the list loses it and every value is
 * then treated as an API key (hunted from 6 characters on).
 */
interface SettingsContext {
  passwords: ReadonlySet<string>;
  words: ReadonlySet<string>;
}
const settingsContexts = new WeakMap<object, SettingsContext>();

/**
 * Whether a password or URL secret is specific enough to hunt verbatim
 * through all text: long enough, not all digits (it would eat numbers), and
 * not an ordinary word: not the user, database or host it goes with, nor any
 * other word of its URL (`postgres://pgembed:pgembed@db/pgembed`), nor one of
 * COMMON_WORDS.
 */
function isSpecific(value: string, words: ReadonlySet<string>): boolean {
  const plain = safeDecode(value).trim();
  const lower = plain.toLowerCase();
  return (
    plain.length >= MIN_PASSWORD_LENGTH &&
    !/^\d+$/.test(plain) &&
    !words.has(lower) &&
    !COMMON_WORDS.has(lower)
  );
}

/** The words of some names, each whole and split at anything not a letter or digit, lower case. */
function wordsOf(names: Iterable<string | undefined>): Set<string> {
  const words = new Set<string>();
  for (const name of names) {
    if (!name) continue;
    const lower = safeDecode(name).toLowerCase();
    words.add(lower);
    for (const word of lower.split(/[^\p{L}\p{N}]+/u)) if (word) words.add(word);
  }
  return words;
}

/** A URL's user name, or undefined. */
function userOf(parts: UrlParts): string | undefined {
  if (parts.userInfo === undefined) return undefined;
  const colon = parts.userInfo.indexOf(':');
  return colon >= 0 ? parts.userInfo.slice(0, colon) : parts.userInfo;
}

/** A URL's password (raw, as the URL carries it), or undefined. */
function passwordOf(parts: UrlParts): string | undefined {
  const colon = parts.userInfo?.indexOf(':') ?? -1;
  return colon >= 0 ? parts.userInfo?.slice(colon + 1) : undefined;
}

/**
 * The ordinary words of a URL: everything in it but its secrets (the
 * password, the values under secret-sounding query keys, the fragment).
 */
function wordsOfUrl(parts: UrlParts): Set<string> {
  const names: Array<string | undefined> = [parts.scheme, userOf(parts)];
  names.push(...parts.hostAndPath.split(/[/:]/));
  for (const pair of parts.query?.split('&') ?? []) {
    const eq = pair.indexOf('=');
    if (eq < 0) continue;
    names.push(pair.slice(0, eq));
    if (!isSecretQueryKey(pair.slice(0, eq))) names.push(pair.slice(eq + 1));
  }
  return wordsOf(names);
}

/**
 * The verbatim needles for some secret values: a plain value as it is (from 6
 * characters on); a URL as a whole (replaced by its redacted form) and, if
 * isSpecific, its password, the values of its secret-sounding query keys (and
 * any value without a key) and its fragment. Each also percent-encoded, as a URL would carry it.
 */
export function secretNeedles(values: Iterable<string | undefined>): Needles {
  const context = settingsContexts.get(values);
  const needles = new Map<string, string>();
  const add = (value: string | undefined, replacement = REDACTED) => {
    if (value === undefined || value.length < MIN_VERBATIM_LENGTH) return;
    for (const form of [value, safeDecode(value), encodeURIComponent(value)]) {
      if (form.length >= MIN_VERBATIM_LENGTH && !needles.has(form)) needles.set(form, replacement);
    }
  };
  const addIfSpecific = (value: string | undefined, words: ReadonlySet<string>) => {
    if (value !== undefined && isSpecific(value, words)) add(value);
  };
  for (const raw of values) {
    const value = raw?.trim();
    if (!value) continue;
    const parts = splitUrl(value);
    if (!parts) {
      if (context?.passwords.has(value)) addIfSpecific(value, context.words);
      else add(value);
      continue;
    }
    const redacted = redactUrl(value);
    if (redacted !== value) add(value, redacted);
    const words = wordsOfUrl(parts);
    addIfSpecific(passwordOf(parts), words);
    for (const pair of parts.query?.split('&') ?? []) {
      const eq = pair.indexOf('=');
      // A value without a key (`?t0ken`) may be anything: hunted like a secret's.
      if (eq < 0) addIfSpecific(pair, words);
      else if (isSecretQueryKey(pair.slice(0, eq))) addIfSpecific(pair.slice(eq + 1), words);
    }
    addIfSpecific(parts.fragment, words);
  }
  // Longest first, so a URL is replaced whole before its password is.
  return [...needles].sort((a, b) => b[0].length - a[0].length);
}

function safeDecode(value: string): string {
  try {
    return decodeURIComponent(value.replaceAll('+', ' '));
  } catch {
    return value;
  }
}

let remembered: Needles = [];

/**
 * Remembers secret values for the rest of the process, so every sink
 * (`redactSecrets` without an explicit list) also hunts for them verbatim.
 */
export function rememberSecrets(values: Iterable<string | undefined>): void {
  const known = new Map(remembered);
  for (const [needle, replacement] of secretNeedles(values)) known.set(needle, replacement);
  remembered = [...known].sort((a, b) => b[0].length - a[0].length);
}

/** Forgets what rememberSecrets remembered (for tests). */
export function forgetSecrets(): void {
  remembered = [];
}

/**
 * The secrets among a process's settings: OPENAI_API_KEY, PGPASSWORD,
 * OPENAI_BASE_URL and DATABASE_URL from the environment (with .env loaded),
 * and any URL among the command-line arguments (`--base-url`). Given to
 * secretNeedles or rememberSecrets as it is, the list also tells them that
 * PGPASSWORD is a password, to hunt only if specific enough beside the user,
 * database and host it goes with (DATABASE_URL's words, PGUSER, PGDATABASE,
 * PGHOST).
 */
export function secretsOfSettings(env: NodeJS.ProcessEnv, argv: readonly string[]): string[] {
  const fromArgs = argv.flatMap((arg) => arg.match(URL_IN_TEXT) ?? []);
  const secrets = SECRET_ENV.map((name) => env[name]);
  // Only a `scheme://` URL can carry a secret: `pglite:./.data/pglite` is a
  // path, which every line about the embedded database must show as it is.
  const urls = URL_ENV.map((name) => env[name]).filter((value) => value && splitUrl(value.trim()));
  const list = [...secrets, ...urls].filter((value): value is string => !!value).concat(fromArgs);
  const password = env.PGPASSWORD?.trim();
  if (password) {
    const database = splitUrl(env.DATABASE_URL?.trim() ?? '');
    const words = wordsOf(PG_NAME_ENV.map((name) => env[name]));
    if (database) for (const word of wordsOfUrl(database)) words.add(word);
    settingsContexts.set(list, { passwords: new Set([password]), words });
  }
  return list;
}

export interface RedactOptions {
  /**
   * The text is JSON lines (the log): only string values are redacted (never
   * keys, numbers or the punctuation), each decoded and encoded again, so
   * every line stays JSON. A line that is not JSON is redacted as text.
   */
  json?: boolean;
}

/**
 * Free text made safe to show or store: every URL in it redacted (see
 * redactUrl), `?key=value` and `password=value` pairs' values replaced, and
 * every known secret replaced wherever it appears. `secrets` defaults to what
 * rememberSecrets was given.
 */
export function redactSecrets(
  text: string,
  secrets?: Iterable<string | undefined>,
  options: RedactOptions = {},
): string {
  const needles = secrets === undefined ? remembered : secretNeedles(secrets);
  return options.json ? redactJsonLines(text, needles) : redactText(text, needles);
}

// A JSON string and, if it is a key, the colon after it.
const JSON_STRING = /("(?:[^"\\]|\\.)*")(\s*:)?/g;

function redactJsonLines(text: string, needles: Needles): string {
  return text
    .split('\n')
    .map((line) => {
      if (line.trim() === '') return line;
      try {
        JSON.parse(line);
      } catch {
        return redactText(line, needles);
      }
      // In valid JSON every `"` outside a string opens one, so this finds
      // exactly its strings.
      return line.replace(JSON_STRING, (token: string, string: string, colon?: string) => {
        if (colon !== undefined) return token;
        const value = JSON.parse(string) as string;
        const redacted = redactText(value, needles);
        return redacted === value ? token : JSON.stringify(redacted);
      });
    })
    .join('\n');
}

function redactText(text: string, needles: Needles): string {
  let out = text;
  for (const [needle, replacement] of needles) out = out.replaceAll(needle, replacement);
  return out
    .replace(URL_IN_TEXT, (url) => {
      // Trailing punctuation belongs to the sentence, not the URL.
      const trail = /[.,;:!)]+$/.exec(url)?.[0] ?? '';
      return redactUrl(url.slice(0, url.length - trail.length)) + trail;
    })
    .replace(QUERY_PAIR, `$1${REDACTED}`)
    .replace(SECRET_PAIR, `$1=${REDACTED}`);
}

/** A JSON-like value with every string in it passed through redactSecrets. */
export function redactValues<T>(value: T, secrets?: Iterable<string | undefined>): T {
  const needles = secrets === undefined ? remembered : secretNeedles(secrets);
  const visit = (v: unknown): unknown => {
    if (typeof v === 'string') return redactText(v, needles);
    if (Array.isArray(v)) return v.map(visit);
    if (v !== null && typeof v === 'object' && Object.getPrototypeOf(v) === Object.prototype) {
      return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, visit(x)]));
    }
    return v;
  };
  return visit(value) as T;
}
