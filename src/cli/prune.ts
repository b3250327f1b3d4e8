import { PRUNE_SETTINGS, parseAge, resolveSettings } from '../config.js';
import type { Command } from './command.js';

export const prune: Command = {
  summary: 'delete finished runs, batch rows and skips older than an age',
  usage: 'pgembed prune --older-than 30d [--dry-run]',
  settings: PRUNE_SETTINGS,
  async run(args) {
    const settings = resolveSettings(PRUNE_SETTINGS, args.flags, process.env);
    const age = parseAge(settings.pruneOlderThan);
    const { prune } = await import('../commands/prune.js');
    return prune(settings, age);
  },
};
