import { type IndexSettings, resolveTarget } from '../config.js';
import { openDatabase } from '../db/connect.js';
import { requireMigrated } from '../db/embedding-column.js';
import { knownModel } from '../provider/models.js';
import { createSearchIndex } from '../sql/index.js';

/** `pgembed index`: the HNSW index search uses, for one provider and model. */
export async function createIndex(settings: IndexSettings): Promise<number> {
  const target = resolveTarget(settings);
  const database = await openDatabase(settings.databaseUrl, { poolMax: 1, command: 'index' });
  try {
    const columnType = await requireMigrated(database.db, 'run `pgembed embed` first');
    const index = await createSearchIndex(
      database.db,
      columnType,
      { ...target, dimensions: settings.dimensions },
      { concurrently: database.backend === 'postgres' },
    );
    const what = `${target.provider}/${target.model} at ${index.dimensions} dimensions (${index.rows.toLocaleString('en-US')} rows, hnsw on embedding::${index.cast.type}(${index.dimensions}), cosine)`;
    const done = {
      created: `created index ${index.name} for ${what}`,
      rebuilt: `rebuilt index ${index.name}, which an unfinished build had left invalid, for ${what}`,
      exists: `index ${index.name} already exists for ${what}: nothing to do`,
    }[index.state];
    // Search embeds the query at the model's own size unless told otherwise.
    const searchDefault = knownModel(target.model)?.dimensions;
    const hint =
      settings.dimensions === undefined &&
      searchDefault !== undefined &&
      searchDefault !== index.dimensions
        ? `; search with --dimensions ${index.dimensions}`
        : '';
    process.stdout.write(`${done}${hint}\n`);
  } finally {
    await database.close();
  }
  return 0;
}
