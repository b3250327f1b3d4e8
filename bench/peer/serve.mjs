// Serves a PGlite data directory (with pgvector) over the Postgres wire
// protocol, so pg-based tools (LangChain's stores, pgembed's pg pool) can use it.
//   node serve.mjs <data-dir> <port>
import { PGlite } from '@electric-sql/pglite';
import { vector } from '@electric-sql/pglite-pgvector';
import { PGLiteSocketServer } from '@electric-sql/pglite-socket';

const [dataDir, port] = process.argv.slice(2);
const db = await PGlite.create(dataDir, { extensions: { vector } });
await db.exec('create extension if not exists vector');
const server = new PGLiteSocketServer({ db, port: Number(port), host: '127.0.0.1', maxConnections: 8 });
await server.start();
process.stdout.write(`listening ${port}\n`);
const stop = async () => {
  await server.stop();
  await db.close();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
