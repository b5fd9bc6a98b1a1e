"""The published Dream code of Fast-dLLM (NVlabs/Fast-dLLM's dream/model/, Apache-2.0: the license's
text is bench/LICENSE-Apache-2.0.txt; changes listed at the top of each file): its modeling (modeling_dream, with the cache arguments past_key_values,
use_cache, dual_cache and replace_position), its config and its block decoding (generation_utils_block:
DreamGenerationMixin._sample with the prefix and dual caches). Import the modules themselves.
Fast-dLLM's package __init__ imports the config and the model; this one imports nothing, so walking
apd_jax's packages loads no torch."""
# Copyright 2025 NVIDIA CORPORATION & AFFILIATES
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# SPDX-License-Identifier: Apache-2.0
# Modified from Dream repos: https://github.com/HKUNLP/Dream
