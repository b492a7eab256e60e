// VeloxQuant: compressed key/value caches for transformer inference.
#pragma once

#include "veloxquant/cache.h"
#include "veloxquant/caches.h"
#include "veloxquant/config.h"
#include "veloxquant/factory.h"
#include "veloxquant/observer.h"
