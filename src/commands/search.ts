import { checkOpenAISettings, resolveTarget, type SearchSettings } from '../config.js';
import { openDatabase } from '../db/connect.js';
import { requireMigrated } from '../db/embedding-column.js';
import { parseSource } from '../db/names.js';
import { inspectSource } from '../db/source.js';
import { ConfigError } from '../errors.js';
import { createProvider } from '../provider/create.js';
import { knownModel, LOCAL_PROVIDER } from '../provider/models.js';
import { terminalSafe } from '../report/terminal-safe.js';
import { dimensionsMismatch, embeddedDimensions, nearestMessages } from '../sql/search.js';

/** `pgembed search`: embeds the query with the embed job's provider and model, then the k nearest. */
export async function search(settings: SearchSettings, query: string): Promise<number> {
  // The same provider and model the embed job would use with these settings.
  const target = resolveTarget(settings);
  if (target.provider !== LOCAL_PROVIDER) checkOpenAISettings(settings);
  const source = parseSource(settings);
  const database = await openDatabase(settings.databaseUrl, { poolMax: 1, command: 'search' });
  try {
    const columnType = await requireMigrated(database.db, 'run `pgembed embed` first');
    const stored = await embeddedDimensions(database.db, target);
    if (stored.length === 0) {
      throw new ConfigError(
        `no embeddings for ${target.provider}/${target.model} yet: run \`pgembed embed\` with the same provider and model first`,
      );
    }
    const has = (dimensions: number) => stored.some((s) => s.dimensions === dimensions);
    // Known before any API call when --dimensions or the model says it.
    const expected = settings.dimensions ?? knownModel(target.model)?.dimensions;
    if (expected !== undefined && !has(expected)) {
      throw new ConfigError(dimensionsMismatch(target, expected, stored));
    }
    const provider = await createProvider({ ...settings, ...target });
    const [vector] = (await provider.embed([query])).vectors;
    if (!vector) throw new Error('the provider returned no vector for the query');
    if (!has(vector.length))
      throw new ConfigError(dimensionsMismatch(target, vector.length, stored));
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
    // Human output: message content is anyone's text, so control characters
    // (escape sequences, bidi overrides) are shown escaped, never sent to the
    // terminal; --json above keeps the exact text.
    process.stdout.write(
      `nearest to "${terminalSafe(query)}" (${target.provider}/${target.model}, ${vector.length} dimensions, cosine):\n`,
    );
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
}

/**
 * One line per hit: an email's Subject when it has one (its headers say
 * little), else the start. Whitespace runs (newlines and tabs included) become
 * one space; the first 100 characters are kept, then every remaining control
 * character is escaped (`\x1b`, `\u202e`).
 */
function previewOf(content: string): string {
  const subject = /^Subject:(.*)$/im.exec(content)?.[1]?.trim();
  const text = subject ? `Subject: ${subject}` : content;
  return terminalSafe(Array.from(text.replace(/\s+/g, ' ').trim()).slice(0, 100).join(''));
}
