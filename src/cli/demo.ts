import { DEMO_SETTINGS, resolveSettings } from '../config.js';
import type { Command } from './command.js';

export const demo: Command = {
  summary: 'seed, embed offline, status and search, in ./.data/demo (about a minute)',
  usage: 'pgembed demo [--limit N]',
  settings: DEMO_SETTINGS,
  async run(args) {
    const { limit } = resolveSettings(DEMO_SETTINGS, args.flags, process.env);
    const { demo, DEMO_LIMIT } = await import('../commands/demo.js');
    return demo(limit ?? DEMO_LIMIT);
  },
};
