import { endianness } from 'node:os';
import pgvector from 'pgvector';
import type { EmbeddingColumnType } from './names.js';

/**
 * A vector as the SQL literal its column type accepts. Values are float32 on
 * the way in; JS prints each as the shortest double that rounds back to the
 * same float32, so Postgres stores exactly what the provider sent. Off the
 * hot path (search queries, tests): batches are written in binary
 * (see vectorSend and src/db/embedding-writer.ts).
 */
export function vectorLiteral(values: ArrayLike<number>, type: EmbeddingColumnType): string {
  const array = Array.from(values);
  return type === 'real[]' ? `{${array.join(',')}}` : pgvector.toSql(array);
}

/** Reads a stored vector back: pgvector text (`[…]`), array text (`{…}`), or a parsed array. */
export function parseVector(value: string | number[]): number[] {
  if (Array.isArray(value)) return value.map(Number);
  if (value.startsWith('{')) return value.slice(1, -1).split(',').map(Number);
  return pgvector.fromSql(value) as number[];
}

const LITTLE_ENDIAN_HOST = endianness() === 'LE';
const FLOAT4_OID = 700;

/**
 * pgvector's binary form (vector_send/vector_recv): int16 dimensions, int16
 * unused, then the float4 values big-endian. The float32 bits are copied,
 * never printed: a 1,536-dimension vector's decimal text is ~16 KB and took
 * 27% of a worker's busy time (BENCHMARKS.md, issue 12); this is one memcpy
 * and one byte swap.
 */
export function vectorSend(vector: Float32Array): Buffer {
  const buf = Buffer.allocUnsafe(4 + vector.byteLength);
  buf.writeInt16BE(vector.length, 0);
  buf.writeInt16BE(0, 2);
  const values = buf.subarray(4);
  Buffer.from(vector.buffer, vector.byteOffset, vector.byteLength).copy(values);
  if (LITTLE_ENDIAN_HOST) values.swap32();
  return buf;
}

/**
 * A one-dimensional float4[] in PostgreSQL's binary array form (array_send):
 * ndim, has-nulls, element type, length, lower bound, then each element as
 * int32 length 4 and its big-endian bits. Written as 32-bit words, the
 * float's bits copied, then every word byte-swapped at once: a DataView
 * write per word showed 291 ms of a PostgreSQL run's 5.3 s busy under the
 * profiler (20,000 vectors of 1,536, a server without pgvector); alone, 20,000
 * took 204-242 ms so and 146-168 ms now (BENCHMARKS.md, "tenth pass").
 */
export function float4ArraySend(vector: Float32Array): Buffer {
  // Never from the shared pool, so its words are aligned; not zeroed, as
  // every word is written.
  const buf = Buffer.allocUnsafeSlow(20 + vector.length * 8);
  const words = new Uint32Array(buf.buffer, buf.byteOffset, 5 + vector.length * 2);
  words[0] = 1;
  words[1] = 0;
  words[2] = FLOAT4_OID;
  words[3] = vector.length;
  words[4] = 1;
  const bits = new Uint32Array(vector.buffer, vector.byteOffset, vector.length);
  for (let i = 0, o = 5; i < bits.length; i++, o += 2) {
    words[o] = 4;
    words[o + 1] = bits[i] as number;
  }
  if (LITTLE_ENDIAN_HOST) buf.swap32();
  return buf;
}
