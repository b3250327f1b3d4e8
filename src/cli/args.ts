import { parseArgs } from 'node:util';
import { type FlagValues, SETTINGS, type SettingName } from '../config.js';
import { ConfigError } from '../errors.js';

export interface ParsedArgs {
  flags: FlagValues;
  positionals: string[];
  help: boolean;
}

/**
 * Parses flags for the given settings (plus `extra` command-specific ones).
 * Unknown flags and missing values become one-line ConfigErrors.
 */
export function parseFlags(
  argv: string[],
  settings: readonly SettingName[],
  extra: Record<string, { type: 'string' | 'boolean' }> = {},
  options: { positionals?: boolean } = {},
): ParsedArgs {
  const spec: Record<string, { type: 'string' | 'boolean'; short?: string }> = {
    help: { type: 'boolean' },
    ...extra,
  };
  for (const name of settings) {
    const def: { flag?: string; short?: string; negatedFlag?: string; kind: string } =
      SETTINGS[name];
    if (def.flag) {
      spec[def.flag] = {
        type: def.kind === 'bool' ? 'boolean' : 'string',
        ...(def.short ? { short: def.short } : {}),
      };
    }
    if (def.negatedFlag) spec[def.negatedFlag] = { type: 'boolean' };
  }
  try {
    const { values, positionals } = parseArgs({
      args: argv,
      options: spec,
      strict: true,
      allowPositionals: options.positionals ?? false,
    });
    return { flags: values as FlagValues, positionals, help: values.help === true };
  } catch (error) {
    throw new ConfigError(describeParseError(error), { cause: error });
  }
}

function describeParseError(error: unknown): string {
  const e = error as { code?: string; message?: string };
  const flag = /'(-[^']*)'/.exec(e.message ?? '')?.[1];
  switch (e.code) {
    case 'ERR_PARSE_ARGS_UNKNOWN_OPTION':
      return `unknown flag ${flag ?? ''} (see --help)`;
    case 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE':
      return `${(e.message ?? '').split('\n')[0]} (see --help)`;
    case 'ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL':
      return `unexpected argument ${/'([^']*)'/.exec(e.message ?? '')?.[1] ?? ''} (flags start with --; see --help)`;
    default:
      return (e.message ?? String(error)).split('\n')[0] ?? 'bad arguments';
  }
}

/** `--help` text from the settings table, so it cannot drift from what is parsed. */
export function helpText(
  usage: string,
  settings: readonly SettingName[],
  extraLines: string[] = [],
): string {
  const rows: Array<[string, string]> = [];
  for (const name of settings) {
    const def: {
      flag?: string;
      short?: string;
      negatedFlag?: string;
      env: string;
      help: string;
      default?: unknown;
      kind: string;
    } = SETTINGS[name];
    const arg =
      def.kind === 'bool' ? '' : def.kind === 'int' || def.kind === 'number' ? ' <n>' : ' <value>';
    const flag = def.flag ? `${def.short ? `-${def.short}, ` : ''}--${def.flag}${arg}` : '';
    const negated = def.negatedFlag ? `, --${def.negatedFlag}` : '';
    const dflt =
      def.default !== undefined && def.kind !== 'bool' ? ` [default: ${def.default}]` : '';
    rows.push([`${flag}${negated}${flag ? '  ' : ''}(${def.env})`, `${def.help}${dflt}`]);
  }
  const width = Math.max(...rows.map(([left]) => left.length));
  return [
    `usage: ${usage}`,
    '',
    ...extraLines,
    'settings (flag, then environment variable; .env is read if present):',
    ...rows.map(([left, right]) => `  ${left.padEnd(width)}  ${right}`),
    `  --help${' '.repeat(Math.max(width - 6, 0))}  show this help`,
  ].join('\n');
}
