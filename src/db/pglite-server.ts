import { existsSync, unlinkSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import type { PGlite } from '@electric-sql/pglite';
import { PGLiteSocketHandler } from '@electric-sql/pglite-socket';
import type { ServeAddress } from './pglite-lock.js';
import type { PGliteSession } from './pglite-session.js';

// sun_path holds 108 bytes on Linux and 104 on macOS, with the closing NUL.
const MAX_SOCKET_PATH_BYTES = 103;
const SOCKET_PORT = 5432;
// Every `--db-pool-size` of every client process, with room to spare.
const MAX_CLIENTS = 256;
// ReadyForQuery: 'Z', length 5, then the transaction status ('I' idle).
const READY_FOR_QUERY = [0x5a, 0, 0, 0, 5] as const;
const IDLE = 0x49;
const SYNC = new Uint8Array([0x53, 0, 0, 0, 4]);
const GSSENC_REQUEST_CODE = 80877104;
const STARTUP = startupPacket({ user: 'postgres', database: 'postgres' });

/**
 * Serves this process's PGlite to other processes, on a unix socket in the
 * data directory (psql -h DIR) or, where that path is too long for a socket,
 * on a loopback port. Never another address.
 *
 * pglite-socket's handler does the wire framing (startup, SSL and cancel
 * requests). Its own multiplexer lets a client's statement run inside a
 * transaction of this process's Kysely driver, so the queue here is ours: a
 * client takes the shared PGliteSession with its first message and gives it
 * back only when the backend says it is idle again (ReadyForQuery 'I'), which
 * is the end of its transaction or of its one statement.
 */
export class PGliteServer {
  readonly #clients = new Set<Socket>();
  #idleWaiters: (() => void)[] = [];
  #stopped = false;

  private constructor(
    private readonly server: Server,
    readonly address: ServeAddress,
  ) {
    server.on('connection', (socket) => {
      this.#clients.add(socket);
      socket.once('close', () => {
        this.#clients.delete(socket);
        if (this.#clients.size === 0) this.#wakeIdle();
      });
    });
  }

  static async start(pglite: PGlite, session: PGliteSession, dir: string): Promise<PGliteServer> {
    const queue = new SessionQueue(pglite, session);
    const server = createServer((socket) => {
      const handler = new PGLiteSocketHandler({
        // The handler takes any object with the queue's three methods.
        queryQueue: queue as never,
        closeOnDetach: true,
      });
      handler.attach(socket).catch(() => socket.destroy());
    });
    server.maxConnections = MAX_CLIENTS;
    const socketPath = join(dir, `.s.PGSQL.${SOCKET_PORT}`);
    let address: ServeAddress;
    if (Buffer.byteLength(socketPath) <= MAX_SOCKET_PATH_BYTES) {
      // We hold the directory's lock, so a socket file here is a dead holder's.
      if (existsSync(socketPath)) unlinkSync(socketPath);
      await listen(server, { path: socketPath });
      address = { socketDir: dir, port: SOCKET_PORT };
    } else {
      await listen(server, { host: '127.0.0.1', port: 0 });
      const info = server.address();
      if (info === null || typeof info !== 'object') throw new Error('no loopback port assigned');
      address = { host: '127.0.0.1', port: info.port };
    }
    return new PGliteServer(server, address);
  }

  get clients(): number {
    return this.#clients.size;
  }

  /** Resolves once no client is connected. */
  whenIdle(): Promise<void> {
    if (this.#clients.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /** Closes the listener and every client connection; safe to call twice. */
  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const socket of this.#clients) socket.destroy();
    await closed;
    this.#wakeIdle();
  }

  #wakeIdle(): void {
    const waiters = this.#idleWaiters;
    this.#idleWaiters = [];
    for (const wake of waiters) wake();
  }
}

/** The exact psql command for an address, as the holder prints it. */
export function psqlCommand(address: ServeAddress): string {
  return 'socketDir' in address
    ? `psql -h ${shellQuote(address.socketDir)} -p ${address.port} -U postgres postgres`
    : `psql -h ${address.host} -p ${address.port} -U postgres postgres`;
}

/**
 * Connection settings for node-postgres. PGlite has one database and one
 * user, whatever the startup packet names, but it must name a user.
 */
export function pgConfig(address: ServeAddress) {
  const where =
    'socketDir' in address
      ? { host: address.socketDir, port: address.port }
      : { host: address.host, port: address.port };
  return { ...where, user: 'postgres', database: 'postgres' };
}

/**
 * What pglite-socket's handler calls for each protocol message of one
 * client (its `handlerId`), in the shape of its own queue.
 */
class SessionQueue {
  /** The release of the session, for the client that holds it. */
  readonly #holding = new Map<number, () => void>();
  /** Clients that sent extended-protocol messages the backend has not yet closed with a Sync. */
  readonly #midExchange = new Set<number>();
  /** Each client's messages run in order, one at a time. */
  readonly #chains = new Map<number, Promise<unknown>>();
  readonly #gone = new Set<number>();

  constructor(
    private readonly pglite: PGlite,
    private readonly session: PGliteSession,
  ) {}

  enqueue(handlerId: number, message: Uint8Array, onData: (data: Uint8Array) => void) {
    const previous = this.#chains.get(handlerId) ?? Promise.resolve();
    const run = previous.catch(() => {}).then(() => this.#run(handlerId, message, onData));
    this.#chains.set(handlerId, run);
    return run;
  }

  async #run(handlerId: number, message: Uint8Array, onData: (data: Uint8Array) => void) {
    if (this.#gone.has(handlerId)) throw new Error('client disconnected');
    if (!this.#holding.has(handlerId)) {
      const release = await this.session.acquire();
      if (this.#gone.has(handlerId)) {
        release();
        throw new Error('client disconnected');
      }
      this.#holding.set(handlerId, release);
    }
    // A startup packet is the only message whose first byte is 0 (its
    // length's high byte). PGlite has one user and one database whatever it
    // names, but a packet without a user is FATAL, and a FATAL at startup
    // leaves the one backend unusable for everyone (seen: "cannot drop active
    // portal" in the holder's next statement). Options in it (-c settings)
    // would change the session everyone shares. So every client starts the same.
    if (message[0] === 0) {
      // libpq may ask for GSSAPI encryption first (pglite-socket answers
      // only SSL requests): 'N', as for SSL, and it goes on in the clear.
      if (message.length === 8 && Buffer.from(message).readInt32BE(4) === GSSENC_REQUEST_CODE) {
        onData(new Uint8Array([0x4e]));
        return 1;
      }
      message = STARTUP;
    }
    // Parse, Bind, Describe, Execute, Close, Flush: an exchange only Sync ends.
    if ('PBDECH'.includes(String.fromCharCode(message[0] ?? 0))) this.#midExchange.add(handlerId);
    let bytes = 0;
    let tail: number[] = [];
    await this.pglite.runExclusive(() =>
      this.pglite.execProtocolRawStream(message, {
        onRawData: (data) => {
          bytes += data.length;
          tail = [...tail, ...data.subarray(Math.max(0, data.length - 6))].slice(-6);
          onData(data);
        },
      }),
    );
    if (tail.length === 6 && READY_FOR_QUERY.every((b, i) => tail[i] === b)) {
      this.#midExchange.delete(handlerId);
      if (tail[5] === IDLE) {
        this.#holding.get(handlerId)?.();
        this.#holding.delete(handlerId);
      }
    }
    return bytes;
  }

  clearQueueForHandler(handlerId: number): void {
    this.#gone.add(handlerId);
  }

  /**
   * A client went away: end what it left open, then give the session back.
   * Never throws: the handler calls it from a socket's close event, and
   * nothing a client did may take the holder down.
   */
  async clearTransactionIfNeeded(handlerId: number): Promise<void> {
    await this.#chains.get(handlerId)?.catch(() => {});
    this.#chains.delete(handlerId);
    this.#gone.delete(handlerId);
    const midExchange = this.#midExchange.delete(handlerId);
    const release = this.#holding.get(handlerId);
    if (!release) return;
    this.#holding.delete(handlerId);
    try {
      if (midExchange) await this.pglite.runExclusive(() => this.pglite.execProtocolRaw(SYNC));
      if (this.pglite.isInTransaction()) await this.pglite.exec('rollback');
    } catch {
      // The backend reports the error to no one; the next statement starts clean.
    } finally {
      release();
    }
  }
}

function startupPacket(parameters: Record<string, string>): Uint8Array {
  const body = Buffer.from(
    `${Object.entries(parameters)
      .map(([key, value]) => `${key}\0${value}\0`)
      .join('')}\0`,
  );
  const packet = Buffer.alloc(8 + body.length);
  packet.writeInt32BE(packet.length, 0);
  packet.writeInt32BE(196608, 4); // protocol 3.0
  body.copy(packet, 8);
  return new Uint8Array(packet);
}

function listen(server: Server, where: { path: string } | { host: string; port: number }) {
  return new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(where, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

function shellQuote(text: string): string {
  return /^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replaceAll("'", `'\\''`)}'`;
}
