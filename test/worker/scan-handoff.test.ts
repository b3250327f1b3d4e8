import { describe, expect, it } from 'vitest';
import type { ClaimedMessage } from '../../src/sql/queue.js';
import { ScanHandoff } from '../../src/worker/scan-handoff.js';

const claimed = (...ids: number[]): ClaimedMessage[] =>
  ids.map((id) => ({
    id: String(id),
    version: '1',
    exists: true,
    content: `message ${id}`,
    sha256Hex: 'ab',
    nonBlank: true,
    current: false,
    force: false,
  }));
const range = (from: number, to: number) =>
  Array.from({ length: to - from + 1 }, (_, i) => from + i);

describe('ScanHandoff', () => {
  it('hands over in id order, ramps up and limits the next chunk to its room, and wakes the scan once half is taken', async () => {
    const handoff = new ScanHandoff(16);
    // The first chunk: an eighth of the room.
    expect(handoff.room()).toBe(2);
    handoff.put(claimed(1, 2));
    // Each next may claim twice what all before it did, within the room.
    expect(handoff.room()).toBe(2);
    handoff.put(claimed(3, 4));
    expect(handoff.room()).toBe(4);
    handoff.put(claimed(...range(5, 8)));
    expect(handoff.room()).toBe(8);
    handoff.put(claimed(...range(9, 16)));
    expect(handoff.room()).toBe(0);
    expect(handoff.claimed).toBe(16);
    let woken = false;
    const again = handoff.roomAgain().then(() => {
      woken = true;
    });
    expect(handoff.take(7).map((m) => m.id)).toEqual(range(1, 7).map(String));
    await Promise.resolve();
    // Nine held: more than half of 16.
    expect(woken).toBe(false);
    expect(handoff.take(1).map((m) => m.id)).toEqual(['8']);
    await again;
    expect(woken).toBe(true);
    expect(handoff.held).toBe(8);
    expect(handoff.room()).toBe(8);
    // What comes next follows what is held.
    handoff.put(claimed(17, 18));
    expect(handoff.take(100).map((m) => m.id)).toEqual(range(9, 18).map(String));
    expect(handoff.take(5)).toEqual([]);
    // Nothing to wait for with half of it free.
    await handoff.roomAgain();
  });

  it('once closed holds nothing, takes no more claims, and lets a waiting scan go on', async () => {
    const handoff = new ScanHandoff(4);
    handoff.put(claimed(1, 2, 3, 4));
    const again = handoff.roomAgain();
    handoff.close();
    await again;
    expect(handoff.held).toBe(0);
    expect(handoff.room()).toBe(0);
    handoff.put(claimed(5));
    expect(handoff.take(10)).toEqual([]);
    handoff.close();
    await handoff.roomAgain();
  });
});
