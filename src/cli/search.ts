import { resolveSettings, SEARCH_SETTINGS } from '../config.js';
import { ConfigError } from '../errors.js';
import type { Command } from './command.js';

export const search: Command = {
  summary: 'the messages nearest to a text, by the embeddings of one model',
  usage: 'pgembed search "query text" [-k 10] [--model …]',
  settings: SEARCH_SETTINGS,
  positionals: true,
  async run(args) {
    const query = args.positionals.join(' ').trim();
    if (!query) throw new ConfigError('give the text to search for: pgembed search "query text"');
    const settings = resolveSettings(SEARCH_SETTINGS, args.flags, process.env);
    const { search } = await import('../commands/search.js');
    return search(settings, query);
  },
};
