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
 * - Known secret values (the API key, the database password, the raw base
 *   URL, a URL's query values) are replaced wherever they appear verbatim.
 */

const REDACTED = '***';

/**
 * Known secrets shorter than this are not searched for verbatim: they would
 * mangle ordinary words. Inside URLs they are redacted all the same.
 */
const MIN_VERBATIM_LENGTH = 6;

/** Settings whose whole value is a secret. */
const SECRET_ENV = ['OPENAI_API_KEY', 'PGPASSWORD'] as const;
/** Settings whose value is a URL that may carry secrets. */
const URL_ENV = ['OPENAI_BASE_URL', 'DATABASE_URL'] as const;

/**
 * Query keys of Postgres URLs whose values are not secret and are ordinary
 * words (`sslmode=require`, `application_name=pgembed`): still `***` inside a
 * URL, but not hunted for verbatim through all other text.
 */
const HARMLESS_QUERY_KEYS = new Set([
  'sslmode',
  'application_name',
  'connect_timeout',
  'target_session_attrs',
  'options',
  'host',
  'port',
  'dbname',
  'user',
  'client_encoding',
  'gssencmode',
  'keepalives',
]);

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
 * The verbatim needles for some secret values: a plain value as it is; a URL
 * as a whole (replaced by its redacted form) and its password, query values
 * and fragment. Each also percent-encoded, as a URL would carry it.
 */
export function secretNeedles(values: Iterable<string | undefined>): Needles {
  const needles = new Map<string, string>();
  const add = (value: string | undefined, replacement = REDACTED) => {
    if (value === undefined || value.length < MIN_VERBATIM_LENGTH) return;
    for (const form of [value, safeDecode(value), encodeURIComponent(value)]) {
      if (form.length >= MIN_VERBATIM_LENGTH && !needles.has(form)) needles.set(form, replacement);
    }
  };
  for (const raw of values) {
    const value = raw?.trim();
    if (!value) continue;
    const parts = splitUrl(value);
    if (!parts) {
      add(value);
      continue;
    }
    const redacted = redactUrl(value);
    if (redacted !== value) add(value, redacted);
    if (parts.userInfo !== undefined) {
      const colon = parts.userInfo.indexOf(':');
      if (colon >= 0) add(parts.userInfo.slice(colon + 1));
    }
    for (const pair of parts.query?.split('&') ?? []) {
      const eq = pair.indexOf('=');
      const key = safeDecode(eq < 0 ? '' : pair.slice(0, eq)).toLowerCase();
      if (!HARMLESS_QUERY_KEYS.has(key)) add(eq < 0 ? pair : pair.slice(eq + 1));
    }
    add(parts.fragment);
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
 * and any URL among the command-line arguments (`--base-url`).
 */
export function secretsOfSettings(env: NodeJS.ProcessEnv, argv: readonly string[]): string[] {
  const fromArgs = argv.flatMap((arg) => arg.match(URL_IN_TEXT) ?? []);
  const secrets = SECRET_ENV.map((name) => env[name]);
  // Only a `scheme://` URL can carry a secret: `pglite:./.data/pglite` is a
  // path, which every line about the embedded database must show as it is.
  const urls = URL_ENV.map((name) => env[name]).filter((value) => value && splitUrl(value.trim()));
  return [...secrets, ...urls].filter((value): value is string => !!value).concat(fromArgs);
}

export interface RedactOptions {
  /**
   * The text is JSON (a log line): look for each known secret as JSON
   * escapes it, so a replacement never breaks the document.
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
  return redactWith(text, secrets === undefined ? remembered : secretNeedles(secrets), options);
}

function redactWith(text: string, needles: Needles, options: RedactOptions): string {
  let out = text;
  for (const [needle, replacement] of needles) {
    const form = options.json ? JSON.stringify(needle).slice(1, -1) : needle;
    out = out.replaceAll(
      form,
      options.json ? JSON.stringify(replacement).slice(1, -1) : replacement,
    );
  }
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
    if (typeof v === 'string') return redactWith(v, needles, {});
    if (Array.isArray(v)) return v.map(visit);
    if (v !== null && typeof v === 'object' && Object.getPrototypeOf(v) === Object.prototype) {
      return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, visit(x)]));
    }
    return v;
  };
  return visit(value) as T;
}
