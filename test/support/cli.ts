import { type ChildProcess, spawn } from 'node:child_process';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { SETTINGS } from '../../src/config.js';

export type CliCommand =
  | 'embed'
  | 'seed'
  | 'migrate'
  | 'status'
  | 'search'
  | 'index'
  | 'demo'
  | 'prune';

export interface CliResult {
  /** Exit code, or null when a signal killed the process. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface CliOptions {
  /** Called for every complete stdout line (pino JSON in a non-TTY child). */
  onStdoutLine?: (line: string) => void;
  /** The child is SIGKILLed and the result rejects after this long. */
  timeoutMs?: number;
  /** Working directory (default: the repository root). */
  cwd?: string;
  /** Node's own flags, before the script (the bench's `--single-threaded-gc`). */
  nodeFlags?: string[];
}

export interface RunningCli {
  child: ChildProcess;
  result: Promise<CliResult>;
  /** Resolves with the first stdout line (seen so far or later) that matches; rejects if the child exits first. */
  waitForStdoutLine(match: (line: string) => boolean, timeoutMs?: number): Promise<string>;
}

export const repoRoot = fileURLToPath(new URL('../..', import.meta.url));

/**
 * Every setting's variable is present but blank unless the test sets it: the CLI
 * reads .env without overriding the environment, so a developer's .env (with a
 * real OPENAI_API_KEY, say) cannot change what a test sees. Blank means unset
 * to the settings resolver.
 */
export function childEnv(env: Record<string, string>): Record<string, string> {
  const blanks = Object.fromEntries(Object.values(SETTINGS).map((s) => [s.env, '']));
  return {
    PATH: process.env.PATH ?? '/usr/bin:/bin',
    HOME: process.env.HOME ?? '/tmp',
    ...blanks,
    ...env,
  };
}

/**
 * The `pgembed` binary, the file `npm ci` links into node_modules/.bin: built
 * by the suite's global-setup, or by `npm run bench` for bench/lib.ts.
 */
export const builtBinary = join(repoRoot, 'dist', 'src', 'cli', 'pgembed.js');

/**
 * Starts `pgembed <command>` as a real child process: the compiled binary
 * (see global-setup's buildBinary), as a user and the Docker image run it.
 */
export function startCli(
  command: CliCommand,
  args: string[],
  env: Record<string, string>,
  options: CliOptions = {},
): RunningCli {
  return startNode(
    `pgembed ${command} ${args.join(' ')}`,
    [...(options.nodeFlags ?? []), builtBinary, command, ...args],
    env,
    options,
  );
}

/**
 * Any node program of the repository as a child (a CLI, the test writer),
 * with the CLI's environment rules, its stdout read line by line, and a
 * deadline. `stdin: true` keeps a pipe open to write to it.
 */
export function startNode(
  label: string,
  argv: string[],
  env: Record<string, string>,
  options: CliOptions & { stdin?: boolean } = {},
): RunningCli {
  const child = spawn(process.execPath, argv, {
    cwd: options.cwd ?? repoRoot,
    env: childEnv(env),
    stdio: [options.stdin ? 'pipe' : 'ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  let partial = '';
  const lines: string[] = [];
  const lineWaiters = new Set<(line: string) => void>();
  const exitWaiters = new Set<() => void>();
  let exited = false;

  child.stdout?.setEncoding('utf8');
  child.stderr?.setEncoding('utf8');
  child.stdout?.on('data', (chunk: string) => {
    stdout += chunk;
    const parts = (partial + chunk).split('\n');
    partial = parts.pop() ?? '';
    for (const line of parts) {
      lines.push(line);
      options.onStdoutLine?.(line);
      for (const waiter of lineWaiters) waiter(line);
    }
  });
  child.stderr?.on('data', (chunk: string) => {
    stderr += chunk;
  });

  const result = new Promise<CliResult>((resolve, reject) => {
    const timeoutMs = options.timeoutMs ?? 45_000;
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(
        new Error(
          `${label} still running after ${timeoutMs} ms\nstdout:\n${stdout}\nstderr:\n${stderr}`,
        ),
      );
    }, timeoutMs);
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    // 'close', not 'exit': the pipes are drained by then, so no output is lost.
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (partial) {
        lines.push(partial);
        options.onStdoutLine?.(partial);
        for (const waiter of lineWaiters) waiter(partial);
      }
      exited = true;
      for (const waiter of exitWaiters) waiter();
      resolve({ code, signal, stdout, stderr });
    });
  });

  const exitedEarly = () =>
    new Error(`${label} exited before the expected line\nstdout:\n${stdout}\nstderr:\n${stderr}`);
  const waitForStdoutLine = (match: (line: string) => boolean, timeoutMs = 30_000) =>
    new Promise<string>((resolve, reject) => {
      const seen = lines.find(match);
      if (seen !== undefined) return resolve(seen);
      if (exited) {
        return reject(exitedEarly());
      }
      const done = () => {
        clearTimeout(timer);
        lineWaiters.delete(onLine);
        exitWaiters.delete(onExit);
      };
      const onLine = (line: string) => {
        if (!match(line)) return;
        done();
        resolve(line);
      };
      const onExit = () => {
        done();
        reject(exitedEarly());
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`no matching stdout line after ${timeoutMs} ms\nstderr:\n${stderr}`));
      }, timeoutMs);
      lineWaiters.add(onLine);
      exitWaiters.add(onExit);
    });

  return { child, result, waitForStdoutLine };
}

/** Runs `pgembed <command>` to completion. */
export function runCli(
  command: CliCommand,
  args: string[],
  env: Record<string, string>,
  options: CliOptions = {},
): Promise<CliResult> {
  return startCli(command, args, env, options).result;
}

/** The stderr lines, without the trailing empty one. */
export function stderrLines(result: CliResult): string[] {
  return result.stderr.split('\n').filter((line) => line !== '');
}

/** The pino log records on stdout whose `msg` is `msg`. */
export function logRecords(stdout: string, msg: string): Array<Record<string, unknown>> {
  return stdout
    .split('\n')
    .filter((line) => line.startsWith('{'))
    .map((line) => JSON.parse(line) as Record<string, unknown>)
    .filter((record) => record.msg === msg);
}

/** True for a pino JSON line whose `msg` is `msg`. */
export function isLog(line: string, msg: string): boolean {
  if (!line.startsWith('{')) return false;
  try {
    return (JSON.parse(line) as { msg?: unknown }).msg === msg;
  } catch {
    return false;
  }
}
