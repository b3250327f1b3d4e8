import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { repoRoot, startNode, stderrLines } from './support/cli.js';
import { createTestDatabase, type TestDatabase } from './support/db.js';

interface PackResult {
  filename: string;
  files: Array<{ path: string; mode: number }>;
}

/**
 * The package as `npm publish` would send it: `npm pack` of this tree (dist/
 * is built by the suite's global-setup; `prepare` builds it otherwise), then
 * unpacked into another project's node_modules and run from there. Its
 * dependencies resolve to this repository's, as the registry's would.
 */
describe('the npm package', () => {
  const scratch = mkdtempSync(join(tmpdir(), 'pgembed-pack-'));
  const app = join(scratch, 'app');
  const installed = join(app, 'node_modules', 'pgembed');
  const manifest = JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8'));
  let packed: PackResult;
  let database: TestDatabase;

  beforeAll(async () => {
    const json = execFileSync(
      'npm',
      ['pack', '--json', '--ignore-scripts', '--pack-destination', scratch],
      {
        cwd: repoRoot,
        encoding: 'utf8',
        env: { ...process.env, npm_config_update_notifier: 'false' },
      },
    );
    packed = (JSON.parse(json) as PackResult[])[0] as PackResult;
    mkdirSync(installed, { recursive: true });
    execFileSync('tar', [
      '-xzf',
      join(scratch, packed.filename),
      '-C',
      installed,
      '--strip-components=1',
    ]);
    symlinkSync(join(repoRoot, 'node_modules'), join(installed, 'node_modules'), 'dir');
    database = await createTestDatabase('pglite');
  }, 120_000);
  afterAll(async () => {
    await database?.drop();
    rmSync(scratch, { recursive: true, force: true });
  });

  it('holds the compiled code, its types and migrations, and nothing of tests, benchmarks or data', () => {
    const paths = packed.files.map((f) => f.path);
    const outside = paths.filter(
      (path) =>
        !/^dist\/(src|migrations)\/.+\.(js|d\.ts)$/.test(path) &&
        !['package.json', 'README.md', 'LICENSE'].includes(path),
    );
    expect(outside).toEqual([]);
    expect(paths).toEqual(expect.arrayContaining(['LICENSE', 'README.md', 'package.json']));
    for (const unwanted of [/^test\//, /^bench\//, /\.data/, /^src\//, /\.map$/, /^\.env/]) {
      expect(paths.filter((path) => unwanted.test(path))).toEqual([]);
    }
    const migrations = readdirSync(join(repoRoot, 'migrations')).map(
      (name) => `dist/migrations/${name.replace(/\.ts$/, '.js')}`,
    );
    expect(migrations.length).toBeGreaterThan(0);
    expect(paths).toEqual(expect.arrayContaining(migrations));
  });

  it('says what it is: bin, exports with types, engines, a license, publishable', () => {
    const paths = new Set(packed.files.map((f) => f.path));
    expect(manifest.private).toBeUndefined();
    expect(manifest.license).toBe('MIT');
    expect(manifest.engines.node).toMatch(/^>=20/);
    expect(paths.has(manifest.bin.pgembed)).toBe(true);
    const bin = packed.files.find((f) => f.path === manifest.bin.pgembed);
    expect((bin?.mode ?? 0) & 0o111, 'the bin is executable').not.toBe(0);
    for (const target of Object.values(manifest.exports['.']) as string[]) {
      expect(paths.has(target.replace(/^\.\//, ''))).toBe(true);
    }
    expect(paths.has(manifest.types)).toBe(true);
  });

  it('runs as another project installs it: the bin migrates and reports on a database', async () => {
    const bin = join(installed, manifest.bin.pgembed);
    const env = { DATABASE_URL: database.url };
    const migrate = await startNode('pgembed migrate', [bin, 'migrate'], env, { cwd: app }).result;
    expect(migrate.code, migrate.stderr).toBe(0);
    const status = await startNode('pgembed status', [bin, 'status', '--json'], env, { cwd: app })
      .result;
    expect(status.code, status.stderr).toBe(0);
    expect(JSON.parse(status.stdout)).toMatchObject({ coverage: [], runs: [] });
    const bad = await startNode('pgembed status', [bin, 'status', '--runs', '0'], env, {
      cwd: app,
    }).result;
    expect(bad.code).toBe(1);
    expect(stderrLines(bad)).toHaveLength(1);
  });

  it('is importable by name, with the library parts it documents', async () => {
    const script = [
      "const pgembed = await import('pgembed');",
      'const kinds = {};',
      "for (const name of ['openDatabase', 'migrateToLatest', 'requireMigrated', 'nearestMessages', 'createProvider', 'parseDatabaseUrl', 'parseSource']) kinds[name] = typeof pgembed[name];",
      "kinds.ConfigError = new pgembed.ConfigError('x') instanceof pgembed.PgembedError;",
      'process.stdout.write(JSON.stringify(kinds));',
    ].join('\n');
    const result = await startNode(
      'import pgembed',
      ['--input-type=module', '-e', script],
      {},
      {
        cwd: app,
      },
    ).result;
    expect(result.code, result.stderr).toBe(0);
    expect(JSON.parse(result.stdout)).toEqual({
      openDatabase: 'function',
      migrateToLatest: 'function',
      requireMigrated: 'function',
      nearestMessages: 'function',
      createProvider: 'function',
      parseDatabaseUrl: 'function',
      parseSource: 'function',
      ConfigError: true,
    });
  });
});
