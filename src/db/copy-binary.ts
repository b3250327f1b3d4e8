import type { EmbeddedRow, WriteTarget } from '../sql/batches.js';
import type { EmbeddingColumnType } from './names.js';
import { float4ArraySend, vectorSend } from './vector.js';

const SIGNATURE = Buffer.from('PGCOPY\n\xff\r\n\0', 'latin1');

/** message_embeddings' columns in the order encodeEmbeddingRows writes them; embedded_at takes its default. */
export const COPY_COLUMNS =
  'provider, model, message_id, embedding, dimensions, content_sha256, input_tokens, truncated, run_id';

/**
 * PostgreSQL's binary COPY format for message_embeddings (COPY_COLUMNS:
 * provider text, model text, message_id bigint, embedding vector|real[],
 * dimensions int, content_sha256 bytea, input_tokens int, truncated boolean,
 * run_id bigint). Binary, because parsing 1,536 decimal floats per row is
 * what made text inserts cost ~2 ms a row on PGlite; binary COPY costs
 * ~0.14 ms. Floats are sent as their exact bits.
 */
export function encodeEmbeddingRows(
  target: WriteTarget,
  rows: EmbeddedRow[],
  type: Exclude<EmbeddingColumnType, 'halfvec'>,
): Buffer {
  const provider = Buffer.from(target.provider, 'utf8');
  const model = Buffer.from(target.model, 'utf8');
  const runId = BigInt(target.runId);
  const shared = 4 + provider.length + (4 + model.length) + (4 + 8);
  const sizes = rows.map((r) => shared + rowSize(r.vector.length, type));
  const buf = Buffer.alloc(SIGNATURE.length + 8 + sizes.reduce((a, b) => a + b, 0) + 2);
  let o = SIGNATURE.copy(buf, 0);
  o = buf.writeInt32BE(0, o); // flags
  o = buf.writeInt32BE(0, o); // header extension length
  for (const row of rows) {
    o = buf.writeInt16BE(9, o); // field count
    o = buf.writeInt32BE(provider.length, o);
    o += provider.copy(buf, o);
    o = buf.writeInt32BE(model.length, o);
    o += model.copy(buf, o);
    o = buf.writeInt32BE(8, o);
    o = buf.writeBigInt64BE(BigInt(row.messageId), o);
    o = writeVector(buf, o, row.vector, type);
    o = buf.writeInt32BE(4, o);
    o = buf.writeInt32BE(row.vector.length, o);
    o = buf.writeInt32BE(32, o);
    o += Buffer.from(row.sha256Hex, 'hex').copy(buf, o);
    o = buf.writeInt32BE(4, o);
    o = buf.writeInt32BE(row.inputTokens, o);
    o = buf.writeInt32BE(1, o);
    o = buf.writeUInt8(row.truncated ? 1 : 0, o);
    o = buf.writeInt32BE(8, o);
    o = buf.writeBigInt64BE(runId, o);
  }
  buf.writeInt16BE(-1, o); // trailer
  return buf;
}

function rowSize(dims: number, type: Exclude<EmbeddingColumnType, 'halfvec'>): number {
  const vectorBytes = type === 'vector' ? 4 + dims * 4 : 20 + dims * 8;
  return 2 + (4 + 8) + (4 + vectorBytes) + (4 + 4) + (4 + 32) + (4 + 4) + (4 + 1);
}

function writeVector(
  buf: Buffer,
  offset: number,
  vector: Float32Array,
  type: Exclude<EmbeddingColumnType, 'halfvec'>,
): number {
  const field = type === 'vector' ? vectorSend(vector) : float4ArraySend(vector);
  const o = buf.writeInt32BE(field.length, offset);
  return o + field.copy(buf, o);
}
