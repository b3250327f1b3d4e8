import { checkOpenAISettings, resolveSettings, resolveTarget, SOURCE_SETTINGS } from '../config.js';
import { openDatabase } from '../db/connect.js';
import { requireMigrated } from '../db/embedding-column.js';
import { inspectSource, parseSource } from '../db/source.js';
import { ConfigError } from '../errors.js';
import { createProvider } from '../provider/create.js';
import { LOCAL_PROVIDER } from '../provider/models.js';
import { countEmbeddings, nearestMessages } from '../sql/search.js';
import { helpText, parseFlags } from './args.js';
import { runCli } from './main.js';

const SETTINGS = [
  'databaseUrl',
  ...SOURCE_SETTINGS,
  'openaiApiKey',
  'openaiBaseUrl',
  'provider',
  'model',
  'dimensions',
  'timeoutMs',
  'searchK',
  'json',
] as const;

await runCli(async (argv) => {
  const args = parseFlags(argv, SETTINGS, {}, { positionals: true });
  if (args.help) {
    process.stdout.write(
      `${helpText('npm run search -- "query text" [-k 10] [--model …]', SETTINGS)}\n`,
    );
    return 0;
  }
  const query = args.positionals.join(' ').trim();
  if (!query) throw new ConfigError('give the text to search for: npm run search -- "query text"');
  const settings = resolveSettings(SETTINGS, args.flags, process.env);
  // The same provider and model the embed job would use with these settings.
  const target = resolveTarget(settings);
  if (target.provider !== LOCAL_PROVIDER) checkOpenAISettings(settings);
  const source = parseSource(settings);
  const database = await openDatabase(settings.databaseUrl, { poolMax: 1 });
  try {
    const columnType = await requireMigrated(database.db, 'run `npm run embed` first');
    if ((await countEmbeddings(database.db, target)) === 0) {
      throw new ConfigError(
        `no embeddings for ${target.provider}/${target.model} yet: run \`npm run embed\` with the same provider and model first`,
      );
    }
    const provider = await createProvider({ ...settings, ...target });
    const [vector] = (await provider.embed([query])).vectors;
    if (!vector) throw new Error('the provider returned no vector for the query');
    await inspectSource(database.db, source);
    const hits = await nearestMessages(
      database.db,
      { ...target, columnType, source },
      vector,
      settings.searchK,
    );
    if (settings.json) {
      process.stdout.write(`${JSON.stringify({ ...target, query, hits }, null, 2)}\n`);
      return 0;
    }
    process.stdout.write(`nearest to "${query}" (${target.provider}/${target.model}, cosine):\n`);
    for (const [i, hit] of hits.entries()) {
      const preview = previewOf(hit.content);
      process.stdout.write(
        `${String(i + 1).padStart(3)}. ${hit.similarity.toFixed(3)}  message ${hit.messageId}  ${preview}\n`,
      );
    }
  } finally {
    await database.close();
  }
  return 0;
});

/** One line per hit: an email's Subject when it has one (its headers say little), else the start. */
function previewOf(content: string): string {
  const subject = /^Subject:(.*)$/im.exec(content)?.[1]?.trim();
  const text = subject ? `Subject: ${subject}` : content;
  return text.replace(/\s+/g, ' ').trim().slice(0, 100);
}
