import { type Kysely, sql } from 'kysely';
import type { MessageSource } from '../db/names.js';
import type { DB } from '../db/schema.js';
import { assertUniqueIds, sourceRelation } from '../db/source.js';

export interface EligibleMessage {
  id: string;
  content: string;
  /** sha256 of the content as read, so the stored hash matches what was embedded. */
  sha256Hex: string;
}

export interface EmbeddingTarget {
  provider: string;
  model: string;
  /** The table or view the messages come from (see db/source.ts). */
  source: MessageSource;
  /** Re-embed even when an embedding of the same content exists. */
  force: boolean;
}

/** A keyset window over message ids: (after, upTo]; null means unbounded. */
export interface IdWindow {
  after: string | null;
  upTo: string | null;
}

const WHOLE_TABLE: IdWindow = { after: null, upTo: null };

// A message needs embedding when it has a non-blank character and no embedding
// for this (provider, model) was made from its current content. The window
// bounds the embeddings side too: without it the planner's anti-join re-reads
// every embedding below the cursor on every page, O(n^2) over a run (42 s for
// the 6,000-email corpus on PGlite).
function eligibleFilter(target: EmbeddingTarget, window: IdWindow = WHOLE_TABLE) {
  const after = window.after === null ? sql`` : sql`and e.message_id > ${window.after}`;
  const upTo = window.upTo === null ? sql`` : sql`and e.message_id <= ${window.upTo}`;
  const upToDate = sql<boolean>`exists (
    select 1 from message_embeddings e
    where e.provider = ${target.provider} and e.model = ${target.model}
      and e.message_id = m.id ${after} ${upTo}
      and e.content_sha256 = sha256(convert_to(m.content, 'UTF8')))`;
  // Parenthesised: callers splice it into larger expressions, `not` included.
  return target.force
    ? sql<boolean>`(m.content ~ '\\S')`
    : sql<boolean>`(m.content ~ '\\S' and not ${upToDate})`;
}

function windowFilter(window: IdWindow) {
  const after = window.after === null ? sql`true` : sql`m.id > ${window.after}`;
  const upTo = window.upTo === null ? sql`true` : sql`m.id <= ${window.upTo}`;
  return sql<boolean>`(${after} and ${upTo})`;
}

/**
 * The next page of eligible messages in `window`. Keyset, never OFFSET: the
 * eligible set shrinks as pages are embedded, so an offset into it skips rows
 * (the run that stalled at ~3,000 of 6,000). `id > $last order by id` walks
 * the primary key and cannot skip.
 */
export async function fetchEligiblePage(
  db: Kysely<DB>,
  target: EmbeddingTarget,
  window: IdWindow,
  limit: number,
): Promise<EligibleMessage[]> {
  const { rows } = await sql<EligibleMessage>`
    select m.id::text as id, m.content,
           encode(sha256(convert_to(m.content, 'UTF8')), 'hex') as "sha256Hex"
    from ${sourceRelation(target.source)} m
    where ${windowFilter(window)} and ${eligibleFilter(target, window)}
    order by m.id
    limit ${limit}`.execute(db);
  // A view's id may repeat: refuse it here, naming the id, before a batch
  // holding both copies fails its upsert or the keyset steps over one.
  const first = rows[0];
  const last = rows[rows.length - 1];
  if (first && last) await assertUniqueIds(db, target.source, first.id, last.id);
  return rows;
}

export interface MessageCensus {
  eligible: number;
  blank: number;
  upToDate: number;
}

/**
 * One pass over messages at the start of a run: how many need embedding, how
 * many are blank (never eligible, but reported), how many are already done.
 */
export async function countMessages(
  db: Kysely<DB>,
  target: EmbeddingTarget,
  options: { migrated?: boolean } = {},
): Promise<MessageCensus> {
  // Before migrations (a dry run) nothing can be up to date.
  const upToDate =
    options.migrated === false
      ? sql`0`
      : sql`count(*) filter (where m.content ~ '\\S' and not ${eligibleFilter(target)})`;
  const { rows } = await sql<MessageCensus>`
    select
      count(*) filter (where ${eligibleFilter(target)})::int as eligible,
      count(*) filter (where m.content !~ '\\S')::int as blank,
      ${upToDate}::int as "upToDate"
    from ${sourceRelation(target.source)} m`.execute(db);
  return rows[0] ?? { eligible: 0, blank: 0, upToDate: 0 };
}
