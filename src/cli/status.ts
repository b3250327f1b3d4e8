import { resolveSettings, STATUS_SETTINGS } from '../config.js';
import type { Command } from './command.js';

export const status: Command = {
  summary: 'what is embedded, queued and spent per model, and the latest runs',
  usage: 'pgembed status [--json] [--runs N]',
  settings: STATUS_SETTINGS,
  async run(args) {
    const settings = resolveSettings(STATUS_SETTINGS, args.flags, process.env);
    const { status } = await import('../commands/status.js');
    return status(settings);
  },
};
