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
  /** Set by the worker that took over its lease: no heartbeat for longer than the lease. */
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
  /** The highest range cursor this run committed; the resume points are embedding_ranges.cursor_id. */
  cursor_id: ColumnType<string | null, string | number | null | undefined, string | number | null>;
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
  sweep_id: ColumnType<string | null, string | null | undefined, string | null>;
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
  created_at: Generated<Timestamp>;
}

export interface EmbeddingSweepsTable {
  id: Generated<string>;
  provider: string;
  model: string;
  force: boolean;
  planned: number;
  ranges: number;
  created_by_run: string | null;
  created_at: Generated<Timestamp>;
  finished_at: Timestamp | null;
}

export type RangeState = 'pending' | 'leased' | 'done';

type NullableId = ColumnType<string | null, string | null | undefined, string | null>;

export interface EmbeddingRangesTable {
  sweep_id: BigintId;
  range_no: number;
  /** Exclusive lower bound; null: from the first id. */
  lo_id: NullableId;
  /** Inclusive upper bound; null: to the last id, including ids inserted later. */
  hi_id: NullableId;
  planned: number;
  state: ColumnType<RangeState, RangeState | undefined, RangeState>;
  cursor_id: NullableId;
  lease_owner: NullableId;
  lease_expires_at: Timestamp | null;
  heartbeat_at: Timestamp | null;
  leases: Counter;
  takeovers: Counter;
  embedded: Counter;
  skipped: Counter;
  done_at: Timestamp | null;
}

export interface DB {
  messages: MessagesTable;
  message_embeddings: MessageEmbeddingsTable;
  embedding_runs: EmbeddingRunsTable;
  embedding_batches: EmbeddingBatchesTable;
  embedding_skips: EmbeddingSkipsTable;
  embedding_sweeps: EmbeddingSweepsTable;
  embedding_ranges: EmbeddingRangesTable;
}
