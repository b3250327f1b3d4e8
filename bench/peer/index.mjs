// LangChain.js's indexing API over the messages table: index() with the
// Postgres record manager and PGVectorStore, OpenAIEmbeddings pointed at the
// test server. Prints one JSON line of figures.
//   node index.mjs <postgres-url> <openai-base-url> <batch-size> <limit>
import { Document } from '@langchain/core/documents';
import { index } from '@langchain/core/indexing';
import { PostgresRecordManager } from '@langchain/community/indexes/postgres';
import { PGVectorStore } from '@langchain/community/vectorstores/pgvector';
import { OpenAIEmbeddings } from '@langchain/openai';
import pg from 'pg';

const [url, baseURL, batchSize, limit] = process.argv.slice(2);
// One connection for everything: PGlite is a single session, and the socket
// server gives it to one connection at a time.
const pool = new pg.Pool({ connectionString: url, max: 1 });
const { rows } = await pool.query('select id::text as id, content from messages order by id limit $1', [Number(limit)]);
const docs = rows.map((r) => new Document({ pageContent: r.content, metadata: { source: r.id } }));

const embeddings = new OpenAIEmbeddings({
  model: 'text-embedding-3-small',
  apiKey: 'bench',
  configuration: { baseURL },
  batchSize: Number(batchSize),
});
// Not PGVectorStore.initialize(): it checks out a client and holds it until
// end() without using it, which with one connection blocks its own next query.
const vectorStore = new PGVectorStore(embeddings, { pool, tableName: 'langchain_pg_embedding' });
await vectorStore.ensureTableInDatabase(1536);
const recordManager = new PostgresRecordManager('pgembed-bench', {
  pool,
  tableName: 'upsertion_records',
});
await recordManager.createSchema();

const started = performance.now();
const result = await index({
  docsSource: docs,
  recordManager,
  vectorStore,
  options: { cleanup: 'incremental', sourceIdKey: 'source' },
});
const elapsedMs = performance.now() - started;
process.stdout.write(`${JSON.stringify({ ...result, messages: docs.length, elapsedMs })}\n`);
await pool.end();
