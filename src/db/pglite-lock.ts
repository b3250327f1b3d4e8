import {
  closeSync,
  openSync,
  readFileSync,
  renameSync,
  statSync,
  unlinkSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { DatabaseBusyError } from '../errors.js';

/**
 * Who holds a PGlite data directory. Two processes opening one directory
 * corrupt it (seen: a table with 2,532 rows for 1,500 messages), so the
 * first one writes this file, exclusively, and everyone else reads it.
 */
export interface LockInfo {
  pid: number;
  host: string;
  /** The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for the holder. */
  procStart: string | null;
  /** The pgembed command that holds it, for the lines others print. */
  command: string;
  startedAt: string;
  /** Where the holder serves the database, once it does. */
  serving?: ServeAddress;
}

/** A unix socket directory: `psql -h socketDir -p port`. */
export type ServeAddress = { socketDir: string; port: number };

/**
 * Connection settings for node-postgres. PGlite has one database and one
 * user, whatever the startup packet names, but it must name a user.
 */
export function pgConfig(address: ServeAddress) {
  return { host: address.socketDir, port: address.port, user: 'postgres', database: 'postgres' };
}

/** The exact psql command that reaches a served directory, as the holder prints it. */
export function psqlCommand(address: ServeAddress): string {
  return `psql -h ${shellQuote(address.socketDir)} -p ${address.port} -U postgres postgres`;
}

function shellQuote(text: string): string {
  return /^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replaceAll("'", `'\\''`)}'`;
}

export const LOCK_FILE = 'pgembed.lock';
const TAKEOVER_FILE = 'pgembed.lock.takeover';
// A lock file created but never written, or a takeover marker, is a process
// that died within the few milliseconds it needs; 5 s is far beyond that.
const HALF_WRITTEN_STALE_MS = 5_000;
const POLL_MS = 100;

/** Directories this process holds, so a second open in the same process fails instead of corrupting. */
const heldHere = new Set<string>();

export type Acquired =
  | { kind: 'held'; lock: HeldLock }
  | { kind: 'served'; holder: LockInfo & { serving: ServeAddress } };

export interface AcquireOptions {
  command: string;
  /** How long to wait for a holder that does not serve (a short command) to finish. */
  waitMs: number;
  /** One line for a person: a takeover, or that we are waiting. */
  notice: (message: string) => void;
}

/**
 * Takes the directory's lock, or finds the live holder that serves it. A
 * lock whose process is gone is taken over, with a notice; a live holder
 * that does not serve is waited for up to `waitMs`, then refused.
 */
export async function acquireDirectoryLock(
  dir: string,
  options: AcquireOptions,
): Promise<Acquired> {
  if (heldHere.has(dir)) {
    throw new DatabaseBusyError(
      `the embedded database ${dir} is already open in this process; open it once and share the handle`,
    );
  }
  const path = join(dir, LOCK_FILE);
  const waitUntil = Date.now() + options.waitMs;
  let saidWaiting = false;
  for (;;) {
    const own = ownInfo(options.command);
    if (tryCreate(path, own)) {
      heldHere.add(dir);
      return { kind: 'held', lock: new HeldLock(dir, path, own) };
    }
    const read = readLock(path);
    if (read === 'missing') continue; // released between our create and read: try again
    if (read === 'unreadable') {
      if (
        ageMs(path) <= HALF_WRITTEN_STALE_MS ||
        !removeStale(dir, path, undefined, options.notice)
      )
        await sleep(POLL_MS);
      continue;
    }
    const holder = read.info;
    if (holder.host !== hostname()) {
      throw new DatabaseBusyError(
        `the embedded database ${dir} is held by pid ${holder.pid} on host ${holder.host} (${holder.command}); pgembed cannot tell from here whether it still runs: stop it, or delete ${path} if it is gone`,
      );
    }
    if (!isAlive(holder)) {
      // Another process may be taking it over right now: look again shortly.
      if (!removeStale(dir, path, read.text, options.notice)) await sleep(POLL_MS);
      continue;
    }
    if (holder.serving) return { kind: 'served', holder: { ...holder, serving: holder.serving } };
    if (Date.now() >= waitUntil) {
      throw new DatabaseBusyError(
        `the embedded database ${dir} is held by pid ${holder.pid} (${holder.command}, since ${holder.startedAt}), which does not serve it to other processes; run this again when it has finished`,
      );
    }
    if (!saidWaiting) {
      saidWaiting = true;
      options.notice(
        `waiting for pid ${holder.pid} (${holder.command}) to release the embedded database ${dir}`,
      );
    }
    await sleep(POLL_MS);
  }
}

/**
 * After a connection to a serving holder failed: does the lock still say
 * that this live holder serves there? If not (it is closing, or it died),
 * the caller looks again: it waits for the holder, or takes the directory over.
 */
export function stillServing(dir: string, holder: LockInfo & { serving: ServeAddress }): boolean {
  const read = readLock(join(dir, LOCK_FILE));
  if (typeof read !== 'object') return false;
  const { info } = read;
  return (
    info.pid === holder.pid &&
    info.procStart === holder.procStart &&
    info.serving?.socketDir === holder.serving.socketDir &&
    isAlive(info)
  );
}

/** The lock this process holds; `release` is safe to call twice. */
export class HeldLock {
  #released = false;
  readonly #onExit = () => this.#removeIfOurs();

  constructor(
    readonly dir: string,
    readonly path: string,
    private info: LockInfo,
  ) {
    // A process that ends without closing (an uncaught error) leaves no lock behind.
    process.once('exit', this.#onExit);
  }

  /**
   * Records where the holder serves (or, with undefined, that it no longer
   * does), atomically (write and rename), so readers never see half of it.
   */
  announce(serving: ServeAddress | undefined): void {
    const { serving: _previous, ...rest } = this.info;
    this.info = serving ? { ...rest, serving } : rest;
    const temp = `${this.path}.${process.pid}.tmp`;
    writeFileSync(temp, JSON.stringify(this.info));
    renameSync(temp, this.path);
  }

  release(): void {
    if (this.#released) return;
    this.#released = true;
    process.off('exit', this.#onExit);
    this.#removeIfOurs();
    heldHere.delete(this.dir);
  }

  #removeIfOurs(): void {
    const read = readLock(this.path);
    if (
      typeof read === 'object' &&
      read.info.pid === this.info.pid &&
      read.info.procStart === this.info.procStart
    ) {
      unlinkQuietly(this.path);
    }
  }
}

function ownInfo(command: string): LockInfo {
  return {
    pid: process.pid,
    host: hostname(),
    procStart: processStart(process.pid),
    command,
    startedAt: new Date().toISOString(),
  };
}

function tryCreate(path: string, info: LockInfo): boolean {
  let fd: number;
  try {
    fd = openSync(path, 'wx', 0o644);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw error;
  }
  try {
    writeSync(fd, JSON.stringify(info));
  } finally {
    closeSync(fd);
  }
  return true;
}

type ReadLock = 'missing' | 'unreadable' | { info: LockInfo; text: string };

function readLock(path: string): ReadLock {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return 'missing';
    throw error;
  }
  try {
    const info = JSON.parse(text) as LockInfo;
    if (typeof info.pid !== 'number' || typeof info.host !== 'string') return 'unreadable';
    return { info, text };
  } catch {
    return 'unreadable'; // being written right now, or its writer died half-way
  }
}

/**
 * Removes a dead holder's lock. Two processes may find the same dead lock:
 * the takeover marker (created exclusively) lets one of them remove it, and
 * it removes only the very lock it judged dead, so a lock just taken by a
 * live process is never removed.
 */
function removeStale(
  dir: string,
  path: string,
  judgedText: string | undefined,
  notice: (message: string) => void,
): boolean {
  const marker = join(dir, TAKEOVER_FILE);
  let fd: number;
  try {
    fd = openSync(marker, 'wx');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
    if (ageMs(marker) > HALF_WRITTEN_STALE_MS) unlinkQuietly(marker);
    return false; // another process is taking over; the caller looks again
  }
  try {
    closeSync(fd);
    const now = readLock(path);
    const current = typeof now === 'object' ? now.text : now === 'unreadable' ? undefined : null;
    if (current === null || current !== judgedText) return false; // it changed meanwhile
    unlinkQuietly(path);
    const dead = judgedText ? (JSON.parse(judgedText) as LockInfo) : undefined;
    notice(
      dead
        ? `took over the embedded database ${dir} from pid ${dead.pid} (${dead.command}, since ${dead.startedAt}), which is no longer running`
        : `took over the embedded database ${dir} from a process that died while taking it`,
    );
    return true;
  } finally {
    unlinkQuietly(marker);
  }
}

function isAlive(info: LockInfo): boolean {
  if (info.pid === process.pid) {
    // Not held here (checked first), so it is a previous process whose pid we
    // now have: common for pid 1 in a restarted container.
    return false;
  }
  try {
    process.kill(info.pid, 0);
  } catch (error) {
    // EPERM: it exists, but belongs to another user.
    if ((error as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  const start = processStart(info.pid);
  return info.procStart === null || start === null || start === info.procStart;
}

/** Field 22 of /proc/PID/stat: start time in clock ticks since boot. Null where there is no /proc. */
export function processStart(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) is in parentheses and may hold spaces.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? null;
  } catch {
    return null;
  }
}

function ageMs(path: string): number {
  try {
    return Date.now() - statSync(path).mtimeMs;
  } catch {
    return 0;
  }
}

function unlinkQuietly(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // already gone
  }
}
