import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  acquireDirectoryLock,
  LOCK_FILE,
  type LockInfo,
  processStart,
} from '../../src/db/pglite-lock.js';
import { DatabaseBusyError } from '../../src/errors.js';

describe('the PGlite directory lock', () => {
  let dir: string;
  let lockPath: string;
  let notices: string[];
  const children: ChildProcess[] = [];
  const options = (waitMs = 0) => ({
    command: 'status',
    waitMs,
    notice: (message: string) => notices.push(message),
  });

  /** A process that is alive until the test ends: a holder that is not us. */
  async function liveProcess(): Promise<number> {
    const child = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1e6)'], {
      stdio: 'ignore',
    });
    children.push(child);
    await new Promise((resolve) => child.once('spawn', resolve));
    return child.pid as number;
  }

  function writeLock(info: Partial<LockInfo> & { pid: number }) {
    const lock: LockInfo = {
      host: hostname(),
      procStart: processStart(info.pid),
      command: 'embed',
      startedAt: '2026-11-29T10:00:00.000Z',
      ...info,
    };
    writeFileSync(lockPath, JSON.stringify(lock));
    return lock;
  }

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'pgembed-lock-'));
    lockPath = join(dir, LOCK_FILE);
    notices = [];
  });
  afterEach(() => {
    for (const child of children.splice(0)) child.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  });

  it('writes who holds the directory, and removes the lock on release, once', async () => {
    const acquired = await acquireDirectoryLock(dir, options());
    if (acquired.kind !== 'held') throw new Error('expected the lock');
    const info = JSON.parse(readFileSync(lockPath, 'utf8')) as LockInfo;
    expect(info).toMatchObject({ pid: process.pid, host: hostname(), command: 'status' });
    expect(info.procStart).toBe(processStart(process.pid));
    acquired.lock.release();
    acquired.lock.release();
    expect(existsSync(lockPath)).toBe(false);
  });

  it('refuses a second open of the same directory in the same process', async () => {
    const acquired = await acquireDirectoryLock(dir, options());
    try {
      await expect(acquireDirectoryLock(dir, options())).rejects.toThrow(
        /already open in this process/,
      );
    } finally {
      if (acquired.kind === 'held') acquired.lock.release();
    }
  });

  it('takes over the lock of a process that is gone, with one notice', async () => {
    const gone = spawnSync(process.execPath, ['-e', '']).pid;
    writeLock({ pid: gone, procStart: '12345' });
    const acquired = await acquireDirectoryLock(dir, options());
    expect(acquired.kind).toBe('held');
    expect(notices).toEqual([
      `took over the embedded database ${dir} from pid ${gone} (embed, since 2026-11-29T10:00:00.000Z), which is no longer running`,
    ]);
    if (acquired.kind === 'held') acquired.lock.release();
  });

  it('takes a live pid with another start time for a reused pid, so a dead holder', async () => {
    writeLock({ pid: await liveProcess(), procStart: 'not-its-start-time' });
    const acquired = await acquireDirectoryLock(dir, options());
    expect(acquired.kind).toBe('held');
    expect(notices).toHaveLength(1);
    if (acquired.kind === 'held') acquired.lock.release();
  });

  it('takes a lock naming this very pid, not held here, for a previous process (pid 1 in a container)', async () => {
    writeLock({ pid: process.pid, procStart: 'a-previous-start' });
    const acquired = await acquireDirectoryLock(dir, options());
    expect(acquired.kind).toBe('held');
    if (acquired.kind === 'held') acquired.lock.release();
  });

  it('refuses in one line naming a live holder that does not serve, when the wait is over', async () => {
    const pid = await liveProcess();
    writeLock({ pid, command: 'search' });
    const error = await acquireDirectoryLock(dir, options(0)).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(DatabaseBusyError);
    expect((error as Error).message).toBe(
      `the embedded database ${dir} is held by pid ${pid} (search, since 2026-11-29T10:00:00.000Z), which does not serve it to other processes; run this again when it has finished`,
    );
    // Nothing was taken: the holder's lock is as it was.
    expect((JSON.parse(readFileSync(lockPath, 'utf8')) as LockInfo).pid).toBe(pid);
  });

  it('waits for a live holder that does not serve, and takes the directory once it lets go', async () => {
    const pid = await liveProcess();
    writeLock({ pid, command: 'seed' });
    const acquired = await acquireDirectoryLock(dir, {
      command: 'status',
      waitMs: 600_000,
      notice: (message) => {
        notices.push(message);
        // The holder finishes and removes its lock, as release() does.
        if (message.startsWith('waiting')) unlinkSync(lockPath);
      },
    });
    expect(notices).toEqual([
      `waiting for pid ${pid} (seed) to release the embedded database ${dir}`,
    ]);
    expect(acquired.kind).toBe('held');
    if (acquired.kind === 'held') acquired.lock.release();
  });

  it('finds a live holder that serves, and where', async () => {
    const pid = await liveProcess();
    writeLock({ pid, serving: { socketDir: dir, port: 5432 } });
    const acquired = await acquireDirectoryLock(dir, options());
    expect(acquired).toMatchObject({
      kind: 'served',
      holder: { pid, serving: { socketDir: dir, port: 5432 } },
    });
  });

  it('refuses a lock taken on another host, whose process it cannot check', async () => {
    writeLock({ pid: 4242, host: 'another-host' });
    await expect(acquireDirectoryLock(dir, options())).rejects.toThrow(
      `the embedded database ${dir} is held by pid 4242 on host another-host (embed); pgembed cannot tell from here whether it still runs: stop it, or delete ${lockPath} if it is gone`,
    );
  });
});
