import type { ColumnType, Generated } from 'kysely';

/**
 * Table interfaces. Names are a contract with psql users and outside tools.
 * Ids are bigint in SQL and strings in JS: exact past 2^53 on both backends
 * (pg returns int8 as text; the PGlite dialect is told to do the same).
 */
type BigintId = ColumnType<string, string | number | bigint, string | number | bigint>;
type Timestamp = ColumnType<Date, Date | string | undefined, Date | string>;
type Counter = ColumnType<number, number | undefined, number>;
/** A bigint counter: read as text on both backends (int8 is parsed as text, like ids). */
type BigCounter = ColumnType<string, number | undefined, number>;

export interface MessagesTable {
  id: BigintId;
  content: string;
  role: string | null;
  conversation_id: string | null;
  created_at: Generated<Timestamp>;
  updated_at: Generated<Timestamp>;
}

export interface MessageEmbeddingsTable {
  provider: string;
  model: string;
  message_id: BigintId;
  /** vector, halfvec or real[] (see migrations): written and read as text. */
  embedding: ColumnType<string | number[], string, string>;
  dimensions: number;
  content_sha256: ColumnType<Buffer | Uint8Array, Buffer | Uint8Array, Buffer | Uint8Array>;
  input_tokens: number;
  truncated: Generated<boolean>;
  run_id: ColumnType<string | null, string | number | null | undefined, string | number | null>;
  embedded_at: Generated<Timestamp>;
}

export type RunStatus =
  | 'running'
  | 'succeeded'
  | 'partial'
  | 'failed'
  | 'interrupted'
  /** No heartbeat for longer than its --lease-ms: its claims are released to others. */
  | 'abandoned';

export interface EmbeddingRunsTable {
  id: Generated<string>;
  provider: string;
  model: string;
  status: RunStatus;
  options: ColumnType<unknown, string, string>;
  host: string;
  pid: number;
  started_at: Generated<Timestamp>;
  finished_at: Timestamp | null;
  heartbeat_at: Generated<Timestamp>;
  /** Eligible messages this run set out to handle (capped by --limit), counted at start. */
  planned: Counter;
  embedded: Counter;
  skipped: Counter;
  truncated: Counter;
  ineligible_blank: Counter;
  /** Kept: tokens of the embeddings committed (sum of its embedding_batches.tokens). */
  tokens: Counter;
  /** Kept: HTTP requests made for the committed batches, retries included (sum of attempts). */
  requests: Counter;
  retries: Counter;
  batches: Counter;
  /** Billed: tokens of every request the provider answered, kept or not (migration 0004). */
  tokens_billed: BigCounter;
  /** Billed: requests the provider answered, kept or not (migration 0004). */
  requests_billed: Counter;
  error: string | null;
  summary: ColumnType<unknown, string | undefined, string>;
  /** Messages given back after a transient failure, to be retried (migration 0005). */
  deferred: Counter;
  /** A --watch run: it runs until stopped (migration 0005). */
  watch: ColumnType<boolean, boolean | undefined, boolean>;
}

export interface EmbeddingBatchesTable {
  run_id: BigintId;
  batch_no: number;
  first_message_id: BigintId;
  last_message_id: BigintId;
  size: number;
  embedded: number;
  skipped: number;
  tokens: number;
  attempts: number;
  latency_ms: number;
  committed_at: Generated<Timestamp>;
}

export interface EmbeddingSkipsTable {
  run_id: BigintId;
  provider: string;
  model: string;
  message_id: BigintId;
  reason: string;
  detail: string;
  input_tokens: number | null;
  /** The content skipped (migration 0005; null for older skips). */
  content_sha256: ColumnType<
    Buffer | Uint8Array | null,
    Buffer | Uint8Array | null | undefined,
    Buffer | Uint8Array | null
  >;
  created_at: Generated<Timestamp>;
}

export interface EmbeddingTargetsTable {
  id: Generated<number>;
  provider: string;
  model: string;
  backfilled_at: Timestamp | null;
  created_at: Generated<Timestamp>;
}

export interface EmbeddingQueueTable {
  target_id: number;
  message_id: BigintId;
  changed_at: Generated<Timestamp>;
  not_before: Timestamp | null;
  attempts: Counter;
  last_error: string | null;
  force: ColumnType<boolean, boolean | undefined, boolean>;
  claimed_by: ColumnType<string | null, string | null | undefined, string | null>;
  claimed_at: Timestamp | null;
}

export interface DB {
  messages: MessagesTable;
  message_embeddings: MessageEmbeddingsTable;
  embedding_runs: EmbeddingRunsTable;
  embedding_batches: EmbeddingBatchesTable;
  embedding_skips: EmbeddingSkipsTable;
  embedding_targets: EmbeddingTargetsTable;
  embedding_queue: EmbeddingQueueTable;
}
