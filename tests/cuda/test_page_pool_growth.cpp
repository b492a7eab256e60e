// The device page pool's growth rule (grown_pool_pages), on the host: runs everywhere.
#include <gtest/gtest.h>

#include <cstddef>

#include "cuda/page_pool.h"

namespace veloxquant::cuda {
namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;

TEST(PagePoolGrowth, HoldsWhatIsNeededAndAtMostTheBound) {
    for (std::size_t page_bytes : {std::size_t{4096}, std::size_t{53248}, 3 * kMiB + 5})
        for (int max_pages : {1, 16, 517, 2048})
            for (int capacity = 0; capacity < max_pages; capacity += 1 + capacity / 3)
                for (int needed = capacity + 1; needed <= max_pages; needed += 1 + needed / 5) {
                    const int pages = grown_pool_pages(needed, capacity, max_pages, page_bytes);
                    ASSERT_GE(pages, needed) << capacity << " " << page_bytes;
                    ASSERT_LE(pages, max_pages) << capacity << " " << page_bytes;
                }
}

TEST(PagePoolGrowth, GrowsByAQuarterAndFillsTheLastGranule) {
    // 53248-byte pages (qjl, 8 heads): 16 at first (832 KB, taken as asked); 32 pages (1.6
    // MiB) are rounded up to the 39 that fill the first 2 MiB.
    EXPECT_EQ(grown_pool_pages(1, 0, 4096, 53248), 16);
    EXPECT_EQ(grown_pool_pages(32, 16, 4096, 53248), 39);
    // Small pages stay small: 16 pages of 2 KB are not rounded to a 2 MiB granule.
    EXPECT_EQ(grown_pool_pages(1, 0, 4096, 2048), 16);
    EXPECT_EQ(grown_pool_pages(17, 16, 4096, 2048), 20);
    // From 512 pages a quarter more is 640 (32.5 MiB): the granules up to 34 MiB hold 669.
    EXPECT_EQ(grown_pool_pages(513, 512, 4096, 53248), 669);
    // A need beyond a quarter is met as asked, and rounded to the granule alike.
    EXPECT_EQ(grown_pool_pages(1000, 512, 4096, 53248), static_cast<int>(26 * 2 * kMiB / 53248));
    // The bound wins over both.
    EXPECT_EQ(grown_pool_pages(513, 512, 600, 53248), 600);
    // Pages of a whole granule: no rounding left to fill.
    EXPECT_EQ(grown_pool_pages(5, 4, 4096, 2 * kMiB), 16);
    EXPECT_EQ(grown_pool_pages(17, 16, 4096, 2 * kMiB), 20);
}

TEST(PagePoolGrowth, GeometricSoThatLongDecodesRecopyRarely) {
    // Token by token from one page to 2048 (64-token pages: 128K tokens): each growth is by at
    // least a quarter, so the pool is re-allocated a few dozen times, not once per page.
    int capacity = 0, growths = 0;
    for (int needed = 1; needed <= 2048; ++needed)
        if (needed > capacity) {
            capacity = grown_pool_pages(needed, capacity, 2048, 53248);
            ++growths;
        }
    EXPECT_EQ(capacity, 2048);
    EXPECT_LE(growths, 20);
}

}  // namespace
}  // namespace veloxquant::cuda
