import { type PGlite, parse, protocol } from '@electric-sql/pglite';
import type { EngineResult } from './pglite-engine.js';

/**
 * A statement this session has prepared: its name and its parameters' types,
 * as the session described them.
 */
interface Prepared {
  name: string;
  parameterTypes: number[];
}

/**
 * How many statements the session keeps prepared. A run repeats a dozen
 * texts (the claims, the scan's chunk, a batch's commit statement with and
 * without skips …); a text that varies with its input (Kysely's `in
 * ($1, $2 …)`) makes one per length, and the least recently used goes.
 */
const KEPT = 64;

/**
 * Statements with parameters as named prepared statements of PGlite's one
 * session: parsed and described once, then bound and run. PGlite's
 * `query()` parses, describes and plans its text anew at every call; for a
 * batch's commit statement of 8 messages that was 0.6 ms to parse and
 * describe and 1.1 to plan, of 2.1 ms (BENCHMARKS.md, "eleventh pass"). A
 * prepared statement is planned once for all its calls where Postgres finds
 * the generic plan no dearer than a custom one (its `plan_cache_mode`,
 * `auto`), and the plan is made again when a table it reads is analyzed or
 * altered. pgJDBC and postgres.js prepare the same way.
 *
 * The same messages as `PGlite.query()` (`parse`, `describe`, `bind`,
 * `describe`, `execute`, `sync`), in the same exclusive turn of the engine,
 * with the same parameters' serializers and the same results' parsers, so a
 * statement's answer is the same either way. Not its `syncToFs()` after a
 * statement: a no-op on the file systems Node has (NodeFS, MemoryFS); only a
 * browser's IndexedDB needs it.
 *
 * A session's reset (DISCARD ALL, when a served client gives it back: see
 * PGliteSession) deallocates every prepared statement: `forget()` then.
 * Names are never reused, so a statement left behind by a failure never
 * clashes with a later one.
 */
export class PreparedStatements {
  /** By text, in order of last use: a Map iterates in insertion order. */
  readonly #byText = new Map<string, Prepared>();
  #named = 0;

  constructor(private readonly pglite: PGlite) {}

  /** The session was reset: nothing is prepared in it any more. */
  forget(): void {
    this.#byText.clear();
  }

  async query<R>(text: string, parameters: readonly unknown[]): Promise<EngineResult<R>> {
    const pglite = this.pglite;
    const send = (message: Uint8Array) => pglite.execProtocolStream(message, { syncToFs: false });
    return pglite._runExclusiveQuery(async () => {
      const messages: Awaited<ReturnType<typeof send>> = [];
      try {
        let prepared = this.#byText.get(text);
        if (prepared) {
          this.#byText.delete(text);
        } else {
          const name = `pgembed_${++this.#named}`;
          await send(protocol.serialize.parse({ name, text }));
          const parameterTypes = parse.parseDescribeStatementResults(
            await send(protocol.serialize.describe({ type: 'S', name })),
          );
          prepared = { name, parameterTypes };
          const oldest = this.#byText.keys().next();
          if (this.#byText.size >= KEPT && !oldest.done) {
            const evicted = this.#byText.get(oldest.value);
            this.#byText.delete(oldest.value);
            if (evicted) await send(protocol.serialize.close({ type: 'S', name: evicted.name }));
          }
        }
        this.#byText.set(text, prepared);
        const types = prepared.parameterTypes;
        const values = parameters.map((value, i) => {
          if (value === null || value === undefined) return null;
          const serializer = pglite.serializers[types[i] ?? 0];
          return serializer ? serializer(value) : String(value);
        });
        messages.push(
          ...(await send(protocol.serialize.bind({ statement: prepared.name, values }))),
          ...(await send(protocol.serialize.describe({ type: 'P' }))),
          ...(await send(protocol.serialize.execute({}))),
        );
      } catch (error) {
        // PGlite's own errors carry the statement, as query()'s do.
        if (error instanceof Error) Object.assign(error, { query: text });
        throw error;
      } finally {
        messages.push(...(await send(protocol.serialize.sync())));
      }
      const [result] = parse.parseResults(messages, pglite.parsers);
      return { rows: (result?.rows ?? []) as R[], affectedRows: result?.affectedRows };
    });
  }
}
