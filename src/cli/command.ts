import type { SettingName } from '../config.js';
import { helpText, type ParsedArgs, parseFlags } from './args.js';

/**
 * One `pgembed` subcommand, as flags: what it takes and how its --help reads.
 * `run` gets the parsed flags and imports the work itself only then, so
 * `--help`, a bare `pgembed` and a bad flag load no driver, SDK or engine.
 */
export interface Command {
  /** One line in the list a bare `pgembed` prints. */
  readonly summary: string;
  /** The usage line of --help, without `usage: `. */
  readonly usage: string;
  readonly settings: readonly SettingName[];
  /** The command's own flags, beyond the settings table. */
  readonly extraFlags?: Record<string, { type: 'string' | 'boolean' }>;
  /** Lines of --help before the settings (extra flags, exit codes). */
  readonly notes?: string[];
  readonly positionals?: boolean;
  run(args: ParsedArgs): Promise<number>;
}

export function commandHelp(command: Command): string {
  return helpText(command.usage, command.settings, command.notes);
}

/** Parses argv for `command`; `--help` prints its help and exits 0 without running it. */
export async function runCommand(command: Command, argv: string[]): Promise<number> {
  const args = parseFlags(argv, command.settings, command.extraFlags, {
    positionals: command.positionals ?? false,
  });
  if (args.help) {
    process.stdout.write(`${commandHelp(command)}\n`);
    return 0;
  }
  return command.run(args);
}
