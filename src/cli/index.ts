import { resolveSettings, resolveTarget } from '../config.js';
import { openDatabase } from '../db/connect.js';
import { requireMigrated } from '../db/embedding-column.js';
import { knownModel } from '../provider/models.js';
import { createSearchIndex } from '../sql/index.js';
import { helpText, parseFlags } from './args.js';
import { runCli } from './main.js';

// The key and URL only decide the default provider, as for search; no API call is made.
const SETTINGS = [
  'databaseUrl',
  'openaiApiKey',
  'openaiBaseUrl',
  'provider',
  'model',
  'dimensions',
] as const;

await runCli(async (argv) => {
  const args = parseFlags(argv, SETTINGS);
  if (args.help) {
    process.stdout.write(
      `${helpText('npm run index -- [--model M] [--provider P] [--dimensions N]', SETTINGS, [
        'Creates the HNSW index `npm run search` uses for one provider and model, at the',
        'dimension of its stored embeddings (--dimensions picks one when there are several).',
        'Safe to run again: an existing index is kept.',
        '',
      ])}\n`,
    );
    return 0;
  }
  const settings = resolveSettings(SETTINGS, args.flags, process.env);
  const target = resolveTarget(settings);
  const database = await openDatabase(settings.databaseUrl, { poolMax: 1, command: 'index' });
  try {
    const columnType = await requireMigrated(database.db, 'run `npm run embed` first');
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
});
