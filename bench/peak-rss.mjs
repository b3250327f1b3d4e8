// `--import` this (bench/startup.ts sets NODE_OPTIONS) to append the
// process's peak resident memory in KiB to PGEMBED_PEAK_RSS_FILE as it exits.
import { appendFileSync } from 'node:fs';

const file = process.env.PGEMBED_PEAK_RSS_FILE;
if (file) process.on('exit', () => appendFileSync(file, `${process.resourceUsage().maxRSS}\n`));
