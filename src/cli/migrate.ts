import { MIGRATE_SETTINGS, resolveSettings } from '../config.js';
import type { Command } from './command.js';

export const migrate: Command = {
  summary: "create or update pgembed's tables, and the source's change capture",
  usage: 'pgembed migrate',
  settings: MIGRATE_SETTINGS,
  async run(args) {
    const settings = resolveSettings(MIGRATE_SETTINGS, args.flags, process.env);
    const { migrate } = await import('../commands/migrate.js');
    return migrate(settings);
  },
};
