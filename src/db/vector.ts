import pgvector from 'pgvector';
import type { EmbeddingColumnType } from './embedding-column.js';

/**
 * A vector as the SQL literal its column type accepts. Values are float32 on
 * the way in; JS prints each as the shortest double that rounds back to the
 * same float32, so Postgres stores exactly what the provider sent.
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
