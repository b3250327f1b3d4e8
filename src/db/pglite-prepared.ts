import { type PGlite, parse, protocol } from '@electric-sql/pglite';
import type { EngineResult } from './pglite-engine.js';

const { serialize } = protocol;

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
 * Statements without parameters (begin, commit, a COPY) run unnamed, as
 * `PGlite.query()` runs every statement. Either way the messages are
 * query()'s (`parse`, `describe`, `bind`, `describe`, `execute`, `sync`),
 * sent in one call rather than a call each, in the same exclusive turn of
 * the engine, with the same parameters' serializers and the same results'
 * parsers, so a statement's answer is the same. Not its `syncToFs()` after a
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

  /**
   * One statement: with parameters, as a named prepared statement; without
   * (begin, commit, a COPY), unnamed, as PGlite's query() runs every one.
   */
  async query<R>(text: string, parameters: readonly unknown[]): Promise<EngineResult<R>> {
    const pglite = this.pglite;
    return pglite._runExclusiveQuery(async () => {
      try {
        const { name, parameterTypes } =
          parameters.length > 0 ? await this.#prepared(text) : { name: '', parameterTypes: [] };
        const values = parameters.map((value, i) => {
          if (value === null || value === undefined) return null;
          const serializer = pglite.serializers[parameterTypes[i] ?? 0];
          return serializer ? serializer(value) : String(value);
        });
        const messages = await this.#send(
          ...(name ? [] : [serialize.parse({ text })]),
          serialize.bind({ statement: name, values }),
          serialize.describe({ type: 'P' }),
          serialize.execute({}),
          serialize.sync(),
        );
        const [result] = parse.parseResults(messages, pglite.parsers);
        return { rows: (result?.rows ?? []) as R[], affectedRows: result?.affectedRows };
      } catch (error) {
        // PGlite's own errors carry the statement, as query()'s do.
        if (error instanceof Error) Object.assign(error, { query: text });
        throw error;
      }
    });
  }

  /** `text` prepared in the session, now or earlier; the least recently used goes past KEPT. */
  async #prepared(text: string): Promise<Prepared> {
    const known = this.#byText.get(text);
    if (known) {
      this.#byText.delete(text);
      this.#byText.set(text, known);
      return known;
    }
    const name = `pgembed_${++this.#named}`;
    const described = await this.#send(
      serialize.parse({ name, text }),
      serialize.describe({ type: 'S', name }),
      serialize.sync(),
    );
    const prepared = { name, parameterTypes: parse.parseDescribeStatementResults(described) };
    const oldest = this.#byText.keys().next();
    if (this.#byText.size >= KEPT && !oldest.done) {
      const evicted = this.#byText.get(oldest.value);
      this.#byText.delete(oldest.value);
      if (evicted)
        await this.#send(serialize.close({ type: 'S', name: evicted.name }), serialize.sync());
    }
    this.#byText.set(text, prepared);
    return prepared;
  }

  /**
   * Protocol messages in one call into the engine, ending with a Sync: the
   * backend reads them all, and after an error skips to that Sync, so the
   * session is ready for the next statement either way. Four calls a
   * statement, as query() makes, took 0.12 ms against 0.08 for one (an
   * insert of one row, 2,000 times).
   */
  async #send(...parts: Uint8Array[]) {
    const message = new Uint8Array(parts.reduce((length, part) => length + part.length, 0));
    let offset = 0;
    for (const part of parts) {
      message.set(part, offset);
      offset += part.length;
    }
    return this.pglite.execProtocolStream(message, { syncToFs: false });
  }
}
