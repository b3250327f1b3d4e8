import type { EmbeddingColumnType } from './names.js';
import { float4ArraySend, vectorSend } from './vector.js';

/** One staged embedding row, in the stage table's column order. */
export interface StageRow {
  messageId: string;
  vector: Float32Array;
  sha256Hex: string;
  inputTokens: number;
  truncated: boolean;
}

const SIGNATURE = Buffer.from('PGCOPY\n\xff\r\n\0', 'latin1');

/**
 * PostgreSQL's binary COPY format for the stage table (message_id bigint,
 * embedding vector|real[], dimensions int, content_sha256 bytea,
 * input_tokens int, truncated boolean). Binary, because parsing 1,536
 * decimal floats per row is what made text inserts cost ~2 ms a row on
 * PGlite; binary COPY costs ~0.14 ms. Floats are sent as their exact bits.
 */
export function encodeStageRows(
  rows: StageRow[],
  type: Exclude<EmbeddingColumnType, 'halfvec'>,
): Buffer {
  const sizes = rows.map((r) => rowSize(r.vector.length, type));
  const buf = Buffer.alloc(SIGNATURE.length + 8 + sizes.reduce((a, b) => a + b, 0) + 2);
  let o = SIGNATURE.copy(buf, 0);
  o = buf.writeInt32BE(0, o); // flags
  o = buf.writeInt32BE(0, o); // header extension length
  for (const row of rows) {
    o = buf.writeInt16BE(6, o); // field count
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
