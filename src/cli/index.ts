import { INDEX_SETTINGS, resolveSettings } from '../config.js';
import type { Command } from './command.js';

export const index: Command = {
  summary: 'create the HNSW index search uses, for one provider and model',
  usage: 'pgembed index [--model M] [--provider P] [--dimensions N]',
  settings: INDEX_SETTINGS,
  notes: [
    'Creates the HNSW index `pgembed search` uses for one provider and model, at the',
    'dimension of its stored embeddings (--dimensions picks one when there are several).',
    'Safe to run again: an existing index is kept.',
    '',
  ],
  async run(args) {
    const settings = resolveSettings(INDEX_SETTINGS, args.flags, process.env);
    const { createIndex } = await import('../commands/index.js');
    return createIndex(settings);
  },
};
