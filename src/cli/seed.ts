import type { SeedInput } from '../commands/seed.js';
import { resolveSettings, SEED_SETTINGS } from '../config.js';
import { ConfigError } from '../errors.js';
import type { Command } from './command.js';

export const seed: Command = {
  summary: 'load messages: the SpamAssassin emails, or a JSON-lines file',
  usage: 'pgembed seed --corpus spamassassin [--limit N] | --jsonl FILE',
  settings: SEED_SETTINGS,
  extraFlags: {
    corpus: { type: 'string' },
    jsonl: { type: 'string' },
    limit: { type: 'string' },
  },
  notes: [
    '  --corpus spamassassin   the 6,046-email SpamAssassin corpus, ids 1..6046',
    '  --corpus spamassassin-text  the same emails as Subject and body, headers dropped',
    '  --jsonl FILE            one {"id", "content", "role"?, "conversation_id"?} per line',
    '  --limit N               only the first N corpus messages',
    '',
  ],
  async run(args) {
    const input = seedInput(args.flags as Record<string, string | undefined>);
    const settings = resolveSettings(SEED_SETTINGS, args.flags, process.env);
    const { seed } = await import('../commands/seed.js');
    return seed(settings, input);
  },
};

function seedInput({ corpus, jsonl, limit }: Record<string, string | undefined>): SeedInput {
  if (!corpus === !jsonl)
    throw new ConfigError('seed needs exactly one of --corpus spamassassin or --jsonl FILE');
  if (corpus !== undefined && corpus !== 'spamassassin' && corpus !== 'spamassassin-text')
    throw new ConfigError(`--corpus must be spamassassin or spamassassin-text, got '${corpus}'`);
  if (limit !== undefined && !/^[1-9]\d*$/.test(limit))
    throw new ConfigError(`--limit must be a whole number of 1 or more, got '${limit}'`);
  if (corpus === undefined) return { jsonl: jsonl as string };
  return { corpus, limit: limit === undefined ? undefined : Number(limit) };
}
