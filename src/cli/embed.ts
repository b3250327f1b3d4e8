import { buildEmbedConfig, EMBED_SETTINGS } from '../config.js';
import type { Command } from './command.js';

const EXIT_CODES = [
  'exit codes: 0 every eligible message embedded; 1 failed (strict-mode skip, fatal provider error,',
  '  retries exhausted in strict mode, the provider failing 3 batches in a row, bad settings, database',
  '  unreachable or lost past --db-retry-ms); 2 finished with skips or deferred messages',
  '  (--allow-partial); 3 stopped at the spend budget (--max-tokens, --max-cost-usd); 130/143',
  '  SIGINT/SIGTERM (the way a --watch worker ends).',
  '',
];

export const embed: Command = {
  summary: 'embed every message not yet embedded for a model; --watch follows changes',
  usage: 'pgembed embed [flags]',
  settings: EMBED_SETTINGS,
  notes: EXIT_CODES,
  async run(args) {
    const config = buildEmbedConfig(args.flags, process.env);
    const levelAsked = args.flags['log-level'] !== undefined || !!process.env.LOG_LEVEL;
    const { embed } = await import('../commands/embed.js');
    return embed(config, levelAsked);
  },
};
