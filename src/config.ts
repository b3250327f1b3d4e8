import {
  EMBEDDING_COLUMN_TYPES,
  type MessageSource,
  parseDatabaseUrl,
  parseSource,
} from './db/names.js';
import { ConfigError } from './errors.js';
import { knownModel, LOCAL_MODEL, LOCAL_PROVIDER } from './provider/models.js';
import { redactUrl } from './redact.js';

/**
 * Every setting, once: its flag, its environment variable, its default and its
 * help text. Flags win over the environment, which wins over the default.
 * `--help` and `.env.example` are checked against this table in tests.
 */
export const SETTINGS = {
  databaseUrl: {
    env: 'DATABASE_URL',
    kind: 'string',
    help: 'postgres://user:pass@host:5432/db, or pglite:<dir> / pglite:memory (default: pglite:./.data/pglite)',
  },
  source: {
    env: 'PGEMBED_SOURCE',
    flag: 'source',
    kind: 'string',
    default: 'messages',
    help: "the table or view holding the messages ('table' or 'schema.table')",
  },
  idColumn: {
    env: 'PGEMBED_ID_COLUMN',
    flag: 'id-column',
    kind: 'string',
    default: 'id',
    help: "the source's id column: an integer type or uuid, unique and not NULL",
  },
  textColumn: {
    env: 'PGEMBED_TEXT_COLUMN',
    flag: 'text-column',
    kind: 'string',
    default: 'content',
    help: "the source's text column (text or varchar)",
  },
  embeddingColumnType: {
    env: 'EMBEDDING_COLUMN_TYPE',
    kind: 'enum',
    values: EMBEDDING_COLUMN_TYPES,
    help: 'vector | halfvec | real[]; default: vector where pgvector exists, else real[] (set at migration)',
  },
  openaiApiKey: { env: 'OPENAI_API_KEY', kind: 'string', secret: true, help: 'API key' },
  openaiBaseUrl: {
    env: 'OPENAI_BASE_URL',
    flag: 'base-url',
    kind: 'string',
    help: 'any OpenAI-compatible server (Ollama, vLLM, TEI, LiteLLM, a proxy); default OpenAI',
  },
  limit: {
    env: 'PGEMBED_LIMIT',
    flag: 'limit',
    kind: 'int',
    min: 1,
    help: 'most eligible messages this run takes on, embedded or skipped (default: all)',
  },
  batchSize: {
    env: 'PGEMBED_BATCH_SIZE',
    flag: 'batch-size',
    kind: 'int',
    min: 1,
    max: 2048,
    default: 64,
    help: 'inputs per API request (OpenAI allows up to 2048)',
  },
  concurrency: {
    env: 'PGEMBED_CONCURRENCY',
    flag: 'concurrency',
    kind: 'int',
    min: 1,
    max: 256,
    default: 4,
    help: 'batches in flight at once; halves on 429s and grows back',
  },
  dbPoolSize: {
    env: 'PGEMBED_DB_POOL_SIZE',
    flag: 'db-pool-size',
    kind: 'int',
    min: 1,
    max: 1000,
    help: 'connections to a Postgres server (default: --concurrency + 1; 1 for a single-session server)',
  },
  leaseMs: {
    env: 'PGEMBED_LEASE_MS',
    flag: 'lease-ms',
    kind: 'int',
    min: 1000,
    default: 30_000,
    help: 'a worker silent this long (it beats every third of it) is presumed dead: its claimed messages go to others',
  },
  watch: {
    env: 'PGEMBED_WATCH',
    flag: 'watch',
    kind: 'bool',
    default: false,
    help: 'keep running: embed inserts and edits, and drop deleted messages, as they happen (until SIGINT/SIGTERM)',
  },
  pollIntervalMs: {
    env: 'PGEMBED_POLL_INTERVAL_MS',
    flag: 'poll-interval-ms',
    kind: 'int',
    min: 10,
    default: 1000,
    help: '--watch: the longest wait between looks at the queue when no wake-up comes (NOTIFY wakes it at once)',
  },
  reconcileIntervalMs: {
    env: 'PGEMBED_RECONCILE_INTERVAL_MS',
    flag: 'reconcile-interval-ms',
    kind: 'int',
    min: 1000,
    default: 60_000,
    help: '--watch on a source without triggers (a view, --no-triggers): how often to scan it for changes',
  },
  triggers: {
    env: 'PGEMBED_TRIGGERS',
    flag: 'triggers',
    negatedFlag: 'no-triggers',
    kind: 'bool',
    default: true,
    help: "capture a table's inserts, edits and deletes with triggers (--no-triggers: scan for them instead)",
  },
  reconcile: {
    env: 'PGEMBED_RECONCILE',
    flag: 'reconcile',
    kind: 'bool',
    default: false,
    help: 'scan the whole source for missing, stale and orphaned embeddings first (rows that bypass triggers: logical replication, triggers disabled)',
  },
  retrySkipped: {
    env: 'PGEMBED_RETRY_SKIPPED',
    flag: 'retry-skipped',
    kind: 'bool',
    default: false,
    help: 'try again the messages skipped before whose text has not changed since',
  },
  dbRetryMs: {
    env: 'PGEMBED_DB_RETRY_MS',
    flag: 'db-retry-ms',
    kind: 'int',
    min: 0,
    default: 60_000,
    help: 'how long to retry a lost database connection (with backoff) before failing the run',
  },
  maxRpm: {
    env: 'PGEMBED_MAX_RPM',
    flag: 'max-rpm',
    kind: 'int',
    min: 1,
    help: "requests per minute, enforced before sending (your tier's limit; default none)",
  },
  maxTpm: {
    env: 'PGEMBED_MAX_TPM',
    flag: 'max-tpm',
    kind: 'int',
    min: 1,
    help: 'tokens per minute, enforced before sending with pre-counted tokens (default none)',
  },
  maxRequestInputs: {
    env: 'PGEMBED_MAX_REQUEST_INPUTS',
    flag: 'max-request-inputs',
    kind: 'int',
    min: 1,
    default: 2048,
    help: "most inputs in one request (OpenAI's cap)",
  },
  maxRequestTokens: {
    env: 'PGEMBED_MAX_REQUEST_TOKENS',
    flag: 'max-request-tokens',
    kind: 'int',
    min: 1,
    default: 300_000,
    help: "most tokens in one request (OpenAI's cap); a batch over it is sent in parts",
  },
  dryRun: {
    env: 'PGEMBED_DRY_RUN',
    flag: 'dry-run',
    kind: 'bool',
    default: false,
    help: 'embed: count eligible messages, tokens, requests and cost, call no API; prune: count what would go; either way write nothing',
  },
  pricePerMillionTokens: {
    env: 'PGEMBED_PRICE_PER_M_TOKENS',
    flag: 'price-per-m-tokens',
    kind: 'number',
    help: "USD per million tokens for --dry-run's estimate (default: the model's list price, if known)",
  },
  maxTokens: {
    env: 'PGEMBED_MAX_TOKENS',
    flag: 'max-tokens',
    kind: 'int',
    min: 1,
    help: 'spend budget in tokens billed: per run, or per UTC day for --watch (every run of the model that day); stop taking batches there, exit 3',
  },
  maxCostUsd: {
    env: 'PGEMBED_MAX_COST_USD',
    flag: 'max-cost-usd',
    kind: 'number',
    help: 'spend budget in USD at --price-per-m-tokens (or the model list price), counted as --max-tokens is',
  },
  allowPartial: {
    env: 'PGEMBED_ALLOW_PARTIAL',
    flag: 'allow-partial',
    kind: 'bool',
    default: false,
    help: 'skip inputs that cannot be embedded, record why, exit 2 (default: stop at the first, exit 1)',
  },
  provider: {
    env: 'PGEMBED_PROVIDER',
    flag: 'provider',
    kind: 'string',
    help: "'local' for the bundled offline model (the default when neither OPENAI_API_KEY nor OPENAI_BASE_URL is set); any other name is a label for the OpenAI-compatible server, stored in every row (default 'openai')",
  },
  model: {
    env: 'PGEMBED_MODEL',
    flag: 'model',
    kind: 'string',
    help: `embedding model (default: text-embedding-3-small; ${LOCAL_MODEL} with --provider local)`,
  },
  dimensions: {
    env: 'PGEMBED_DIMENSIONS',
    flag: 'dimensions',
    kind: 'int',
    min: 1,
    help: "vector size to request (default: the model's own)",
  },
  force: {
    env: 'PGEMBED_FORCE',
    flag: 'force',
    kind: 'bool',
    default: false,
    help: 're-embed messages even when their content has not changed',
  },
  maxRetries: {
    env: 'PGEMBED_MAX_RETRIES',
    flag: 'max-retries',
    kind: 'int',
    min: 0,
    max: 100,
    default: 5,
    help: 'retries per request for 429, 408/409, 5xx, resets and timeouts',
  },
  maxRetryWaitMs: {
    env: 'PGEMBED_MAX_RETRY_WAIT_MS',
    flag: 'max-retry-wait-ms',
    kind: 'int',
    min: 0,
    default: 60_000,
    help: 'cap on any single wait between retries, including server-requested ones',
  },
  timeoutMs: {
    env: 'PGEMBED_TIMEOUT_MS',
    flag: 'timeout-ms',
    kind: 'int',
    min: 1,
    default: 60_000,
    help: 'timeout of one API request',
  },
  maxInputTokens: {
    env: 'PGEMBED_MAX_INPUT_TOKENS',
    flag: 'max-input-tokens',
    kind: 'int',
    min: 1,
    help: "context limit checked before sending (default: the model's known limit, 8192 for OpenAI's; none for unknown models)",
  },
  truncate: {
    env: 'PGEMBED_TRUNCATE',
    flag: 'truncate',
    kind: 'bool',
    default: false,
    help: 'embed the first N tokens of over-long inputs instead, marked truncated',
  },
  manifest: {
    env: 'PGEMBED_MANIFEST',
    flag: 'manifest',
    kind: 'string',
    help: 'write a JSON manifest of the run (counts, skipped ids by reason) to this file',
  },
  migrate: {
    env: 'PGEMBED_MIGRATE',
    flag: 'migrate',
    negatedFlag: 'no-migrate',
    kind: 'bool',
    default: true,
    help: 'apply pending migrations before embedding (--no-migrate to skip)',
  },
  pruneOlderThan: {
    env: 'PGEMBED_PRUNE_OLDER_THAN',
    flag: 'older-than',
    kind: 'string',
    help: 'prune: history older than this goes (30d, 12h, 90m); required',
  },
  json: {
    env: 'PGEMBED_JSON',
    flag: 'json',
    kind: 'bool',
    default: false,
    help: 'print JSON instead of text (status, search)',
  },
  statusRuns: {
    env: 'PGEMBED_STATUS_RUNS',
    flag: 'runs',
    kind: 'int',
    min: 1,
    default: 10,
    help: 'how many runs status lists, latest first',
  },
  searchK: {
    env: 'PGEMBED_SEARCH_K',
    flag: 'k',
    short: 'k',
    kind: 'int',
    min: 1,
    max: 1000,
    default: 10,
    help: 'how many nearest messages search prints',
  },
  metricsPort: {
    env: 'PGEMBED_METRICS_PORT',
    flag: 'metrics-port',
    kind: 'int',
    min: 0,
    max: 65535,
    help: 'serve Prometheus /metrics, /healthz and /readyz on this port (default: off; 0 picks a free one)',
  },
  metricsHost: {
    env: 'PGEMBED_METRICS_HOST',
    flag: 'metrics-host',
    kind: 'string',
    default: '127.0.0.1',
    help: 'the address --metrics-port listens on (0.0.0.0 to be scraped from other hosts)',
  },
  logLevel: {
    env: 'LOG_LEVEL',
    flag: 'log-level',
    kind: 'enum',
    values: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'],
    default: 'info',
    help: 'log level',
  },
} as const satisfies Record<string, SettingDefinition>;

interface SettingDefinition {
  env: string;
  flag?: string;
  /** One-letter alias: `-k 10`. */
  short?: string;
  negatedFlag?: string;
  kind: 'string' | 'int' | 'number' | 'bool' | 'enum';
  values?: readonly string[];
  min?: number;
  max?: number;
  default?: string | number | boolean;
  secret?: boolean;
  help: string;
}

export type SettingName = keyof typeof SETTINGS;
type ValueOf<D> = D extends { kind: 'int' | 'number' }
  ? number
  : D extends { kind: 'bool' }
    ? boolean
    : D extends { values: readonly (infer V)[] }
      ? V
      : string;
type Resolved<D> = D extends { default: unknown } ? ValueOf<D> : ValueOf<D> | undefined;
export type Settings = { readonly [K in SettingName]: Resolved<(typeof SETTINGS)[K]> };

/** Flag values as parsed by the CLI: strings, or true for a bare boolean flag. */
export type FlagValues = Partial<Record<string, string | boolean>>;

/** Resolves the named settings from flags, then env, then defaults. */
export function resolveSettings<K extends SettingName>(
  names: readonly K[],
  flags: FlagValues,
  env: NodeJS.ProcessEnv,
): Pick<Settings, K> {
  const out: Record<string, unknown> = {};
  for (const name of names) {
    const def: SettingDefinition = SETTINGS[name];
    const fromFlag = def.flag ? flags[def.flag] : undefined;
    const negated = def.negatedFlag ? flags[def.negatedFlag] : undefined;
    if (negated === true) {
      out[name] = false;
    } else if (fromFlag !== undefined) {
      out[name] = parseValue(def, fromFlag, `--${def.flag}`);
    } else if (env[def.env] !== undefined && env[def.env] !== '') {
      out[name] = parseValue(def, env[def.env] as string, def.env);
    } else {
      out[name] = def.default;
    }
  }
  return out as Pick<Settings, K>;
}

function parseValue(def: SettingDefinition, raw: string | boolean, source: string): unknown {
  if (def.kind === 'bool') {
    if (typeof raw === 'boolean') return raw;
    const v = raw.trim().toLowerCase();
    if (['1', 'true', 'yes', 'on'].includes(v)) return true;
    if (['0', 'false', 'no', 'off'].includes(v)) return false;
    throw new ConfigError(`${source} must be true or false, got '${raw}'`);
  }
  if (typeof raw === 'boolean') throw new ConfigError(`${source} needs a value`);
  if (def.kind === 'int') {
    const range = `${def.min ?? 0}${def.max !== undefined ? ` to ${def.max}` : ' or more'}`;
    if (!/^\d+$/.test(raw.trim())) {
      throw new ConfigError(`${source} must be a whole number (${range}), got '${raw}'`);
    }
    const n = Number(raw);
    if ((def.min !== undefined && n < def.min) || (def.max !== undefined && n > def.max)) {
      throw new ConfigError(`${source} must be ${range}, got ${n}`);
    }
    return n;
  }
  if (def.kind === 'number') {
    const n = Number(raw);
    if (raw.trim() === '' || !Number.isFinite(n) || n < (def.min ?? 0)) {
      throw new ConfigError(`${source} must be a number of ${def.min ?? 0} or more, got '${raw}'`);
    }
    return n;
  }
  if (def.kind === 'enum' && !def.values?.includes(raw)) {
    throw new ConfigError(`${source} must be one of ${def.values?.join(', ')}, got '${raw}'`);
  }
  if (raw.trim() === '') throw new ConfigError(`${source} must not be empty`);
  return raw;
}

/** Where the messages are: every command that reads them takes these. */
export const SOURCE_SETTINGS = ['source', 'idColumn', 'textColumn'] as const;

/** `status`: what is embedded, queued and spent, and the latest runs. */
export const STATUS_SETTINGS = [
  'databaseUrl',
  ...SOURCE_SETTINGS,
  'json',
  'statusRuns',
] as const satisfies readonly SettingName[];
export type StatusSettings = Pick<Settings, (typeof STATUS_SETTINGS)[number]>;

/** `search`: the provider and model the embed job would use, to embed the query. */
export const SEARCH_SETTINGS = [
  'databaseUrl',
  ...SOURCE_SETTINGS,
  'openaiApiKey',
  'openaiBaseUrl',
  'provider',
  'model',
  'dimensions',
  'timeoutMs',
  'searchK',
  'json',
] as const satisfies readonly SettingName[];
export type SearchSettings = Pick<Settings, (typeof SEARCH_SETTINGS)[number]>;

/** `index`: the key and URL only decide the default provider, as for search; no API call is made. */
export const INDEX_SETTINGS = [
  'databaseUrl',
  'openaiApiKey',
  'openaiBaseUrl',
  'provider',
  'model',
  'dimensions',
] as const satisfies readonly SettingName[];
export type IndexSettings = Pick<Settings, (typeof INDEX_SETTINGS)[number]>;

/** `seed`: where the messages go; what is read is the command's own flags. */
export const SEED_SETTINGS = [
  'databaseUrl',
  'embeddingColumnType',
  'logLevel',
] as const satisfies readonly SettingName[];
export type SeedSettings = Pick<Settings, (typeof SEED_SETTINGS)[number]>;

/** `demo`: its own embedded database and the local model; only how many to embed. */
export const DEMO_SETTINGS = ['limit'] as const satisfies readonly SettingName[];

/** `prune`: the database, the source (a skip is kept while its message waits), the age. */
export const PRUNE_SETTINGS = [
  'databaseUrl',
  ...SOURCE_SETTINGS,
  'pruneOlderThan',
  'dryRun',
] as const satisfies readonly SettingName[];
export type PruneSettings = Pick<Settings, (typeof PRUNE_SETTINGS)[number]>;

const DURATION_UNITS = { d: 'days', h: 'hours', m: 'minutes', s: 'seconds' } as const;

/** `30d` → `30 days`: a Postgres interval; anything else is a one-line ConfigError. */
export function parseAge(text: string | undefined): string {
  const match = /^(\d+)([dhms])$/.exec(text?.trim() ?? '');
  if (!match) {
    throw new ConfigError(
      `--older-than ${text === undefined ? 'is required' : `'${text}' is not an age`}: give a whole number and a unit, d, h, m or s (30d, 12h)`,
    );
  }
  return `${match[1]} ${DURATION_UNITS[match[2] as keyof typeof DURATION_UNITS]}`;
}

/** How a source's changes are captured: set by `migrate` and by `embed`. */
export const CAPTURE_SETTINGS = ['triggers'] as const;

/** `migrate`: the schema, the source whose changes are captured, the column type. */
export const MIGRATE_SETTINGS = [
  'databaseUrl',
  ...SOURCE_SETTINGS,
  ...CAPTURE_SETTINGS,
  'embeddingColumnType',
  'logLevel',
] as const satisfies readonly SettingName[];
export type MigrateSettings = Pick<Settings, (typeof MIGRATE_SETTINGS)[number]>;

export const EMBED_SETTINGS = [
  'databaseUrl',
  ...SOURCE_SETTINGS,
  'embeddingColumnType',
  'openaiApiKey',
  'openaiBaseUrl',
  'limit',
  'batchSize',
  'concurrency',
  'dbPoolSize',
  ...CAPTURE_SETTINGS,
  'leaseMs',
  'watch',
  'pollIntervalMs',
  'reconcileIntervalMs',
  'reconcile',
  'retrySkipped',
  'dbRetryMs',
  'maxRpm',
  'maxTpm',
  'maxRequestInputs',
  'maxRequestTokens',
  'dryRun',
  'pricePerMillionTokens',
  'maxTokens',
  'maxCostUsd',
  'allowPartial',
  'provider',
  'model',
  'dimensions',
  'force',
  'maxRetries',
  'maxRetryWaitMs',
  'timeoutMs',
  'maxInputTokens',
  'truncate',
  'manifest',
  'migrate',
  'metricsPort',
  'metricsHost',
  'logLevel',
] as const satisfies readonly SettingName[];

export type EmbedConfig = Omit<
  Pick<Settings, (typeof EMBED_SETTINGS)[number]>,
  'provider' | 'model'
> & {
  readonly provider: string;
  readonly model: string;
  /** True when --provider was not given and no OpenAI key or URL was set: the local model. */
  readonly localByDefault: boolean;
  readonly messageSource: MessageSource;
  /** maxInputTokens after the model's known limit is applied; undefined: rely on the provider. */
  readonly effectiveMaxInputTokens: number | undefined;
  /** The spend budget in tokens billed (--max-tokens, --max-cost-usd); undefined: none. */
  readonly budgetTokens: number | undefined;
};

/** The embed job's frozen config. Cross-setting checks live here, not in the CLI. */
export function buildEmbedConfig(flags: FlagValues, env: NodeJS.ProcessEnv): EmbedConfig {
  const settings = resolveSettings(EMBED_SETTINGS, flags, env);
  parseDatabaseUrl(settings.databaseUrl); // fail on a bad scheme before any work
  const target = resolveTarget(settings);
  if (target.provider !== LOCAL_PROVIDER && !settings.dryRun) {
    checkOpenAISettings(settings);
  }
  const model = knownModel(target.model);
  const messageSource = parseSource(settings);
  if (settings.watch && settings.dryRun) {
    throw new ConfigError(
      '--watch and --dry-run do not go together: a dry run counts once and ends',
    );
  }
  return Object.freeze({
    ...settings,
    ...target,
    messageSource,
    effectiveMaxInputTokens: settings.maxInputTokens ?? model?.maxInputTokens,
    budgetTokens: budgetTokens(settings, model?.usdPerMillionTokens),
  });
}

/**
 * The spend budget in tokens billed: the lower of --max-tokens and what
 * --max-cost-usd buys at the price given or the model's list price.
 */
function budgetTokens(
  settings: {
    maxTokens: number | undefined;
    maxCostUsd: number | undefined;
    pricePerMillionTokens: number | undefined;
  },
  listPrice: number | undefined,
): number | undefined {
  const { maxTokens, maxCostUsd } = settings;
  if (maxCostUsd === undefined) return maxTokens;
  if (!(maxCostUsd > 0)) throw new ConfigError('--max-cost-usd must be more than 0');
  const price = settings.pricePerMillionTokens ?? listPrice;
  if (price === undefined) {
    throw new ConfigError(
      '--max-cost-usd needs a price: this model has no known list price; give --price-per-m-tokens (USD per million tokens)',
    );
  }
  // A free model (the local one) has no cost to cap.
  const byCost = price > 0 ? Math.floor((maxCostUsd / price) * 1_000_000) : undefined;
  if (byCost === undefined) return maxTokens;
  return maxTokens === undefined ? byCost : Math.min(maxTokens, byCost);
}

/**
 * Provider and model: `local` (the bundled model) when asked for, or when
 * nothing points at an OpenAI-compatible server, so a newcomer needs no key.
 */
export function resolveTarget(settings: {
  provider?: string | undefined;
  model?: string | undefined;
  openaiApiKey?: string | undefined;
  openaiBaseUrl?: string | undefined;
  dimensions?: number | undefined;
}): { provider: string; model: string; localByDefault: boolean } {
  const localByDefault =
    settings.provider === undefined && !settings.openaiApiKey && !settings.openaiBaseUrl;
  const provider = settings.provider ?? (localByDefault ? LOCAL_PROVIDER : 'openai');
  if (provider !== LOCAL_PROVIDER) {
    return { provider, model: settings.model ?? 'text-embedding-3-small', localByDefault };
  }
  if (settings.model !== undefined && settings.model !== LOCAL_MODEL) {
    throw new ConfigError(
      `--model ${settings.model} is not available with --provider local, which has only ${LOCAL_MODEL}; for other models set OPENAI_BASE_URL or OPENAI_API_KEY`,
    );
  }
  if (settings.dimensions !== undefined && settings.dimensions !== 512) {
    throw new ConfigError(`--dimensions ${settings.dimensions}: the local model has 512 only`);
  }
  return { provider, model: LOCAL_MODEL, localByDefault };
}

export function checkOpenAISettings(settings: {
  openaiApiKey?: string | undefined;
  openaiBaseUrl?: string | undefined;
}): void {
  if (settings.openaiBaseUrl) {
    let url: URL;
    try {
      url = new URL(settings.openaiBaseUrl);
    } catch {
      throw new ConfigError(`OPENAI_BASE_URL is not a URL: '${redactUrl(settings.openaiBaseUrl)}'`);
    }
    // Node's fetch refuses a URL with credentials in it, on every request.
    if (url.username || url.password) {
      throw new ConfigError(
        `OPENAI_BASE_URL must not hold a user name or password (${redactUrl(settings.openaiBaseUrl)}): put the key in OPENAI_API_KEY`,
      );
    }
  } else if (!settings.openaiApiKey) {
    throw new ConfigError(
      'OPENAI_API_KEY is not set: export it (or put it in .env), point OPENAI_BASE_URL at an OpenAI-compatible server, or use --provider local',
    );
  }
}
