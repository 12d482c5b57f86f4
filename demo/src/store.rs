//! The shop's in-memory state, bounded.
//!
//! A demo that runs for hours under a load generator must not grow without bound, so
//! every table has a capacity and evicts its oldest entry when full; an evicted user
//! takes their token and e-mail index with them. One `std` mutex guards everything:
//! critical sections are short and never await, and a poisoned lock is recovered
//! because the state is rebuilt by every request anyway.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::model::{Cart, Order, Product, User};

/// How many of each record the store keeps before evicting the oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Registered users.
    pub users: usize,
    /// Open carts.
    pub carts: usize,
    /// Orders.
    pub orders: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity { users: 5_000, carts: 5_000, orders: 10_000 }
    }
}

/// A map that remembers insertion order and drops the oldest entry past `cap`.
#[derive(Debug)]
struct Bounded<T> {
    map: HashMap<u64, T>,
    order: VecDeque<u64>,
    cap: usize,
}

impl<T> Bounded<T> {
    fn new(cap: usize) -> Self {
        Bounded { map: HashMap::new(), order: VecDeque::new(), cap: cap.max(1) }
    }

    /// Inserts, returning whatever was evicted to make room.
    fn insert(&mut self, id: u64, value: T) -> Vec<T> {
        let mut evicted = Vec::new();
        while self.map.len() >= self.cap {
            let Some(oldest) = self.order.pop_front() else { break };
            evicted.extend(self.map.remove(&oldest));
        }
        if self.map.insert(id, value).is_none() {
            self.order.push_back(id);
        }
        evicted
    }

    fn get(&self, id: u64) -> Option<&T> {
        self.map.get(&id)
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        self.map.get_mut(&id)
    }

    fn remove(&mut self, id: u64) -> Option<T> {
        let value = self.map.remove(&id)?;
        self.order.retain(|&k| k != id);
        Some(value)
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

#[derive(Debug)]
struct Inner {
    products: Vec<Product>,
    users: Bounded<User>,
    tokens: HashMap<String, u64>,
    emails: HashMap<String, u64>,
    carts: Bounded<Cart>,
    orders: Bounded<Order>,
    user_orders: HashMap<u64, VecDeque<u64>>,
    next_id: u64,
}

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another account already uses this e-mail address.
    #[error("an account with this e-mail already exists")]
    EmailTaken,
    /// The record does not exist (or was evicted).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// Not enough stock for a product.
    #[error("product {product_id} has only {available} left")]
    OutOfStock {
        /// The product.
        product_id: u64,
        /// Units left.
        available: u32,
    },
}

/// Counts of what the store holds, for health checks and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Users held.
    pub users: usize,
    /// Carts held.
    pub carts: usize,
    /// Orders held.
    pub orders: usize,
}

/// The shop's state; see the [module docs](self).
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
}

impl Store {
    /// A store holding `products`, with the given capacities.
    pub fn new(products: Vec<Product>, capacity: Capacity) -> Self {
        Store {
            inner: Mutex::new(Inner {
                products,
                users: Bounded::new(capacity.users),
                tokens: HashMap::new(),
                emails: HashMap::new(),
                carts: Bounded::new(capacity.carts),
                orders: Bounded::new(capacity.orders),
                user_orders: HashMap::new(),
                next_id: 1_000,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh id, unique across every kind of record in this store.
    pub fn next_id(&self) -> u64 {
        let mut inner = self.lock();
        inner.next_id += 1;
        inner.next_id
    }

    /// How much the store holds.
    pub fn stats(&self) -> StoreStats {
        let inner = self.lock();
        StoreStats { users: inner.users.len(), carts: inner.carts.len(), orders: inner.orders.len() }
    }

    /// Products matching `category`, from `offset`, at most `limit`, and the match count.
    pub fn products(&self, category: Option<&str>, offset: usize, limit: usize) -> (Vec<Product>, usize) {
        let inner = self.lock();
        let matching = || inner.products.iter().filter(|p| category.is_none_or(|c| p.category == c));
        (matching().skip(offset).take(limit).cloned().collect(), matching().count())
    }

    /// One product.
    pub fn product(&self, id: u64) -> Option<Product> {
        self.lock().products.iter().find(|p| p.id == id).cloned()
    }

    /// Registers a user; their e-mail must be unused.
    pub fn add_user(&self, user: User) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let email = user.email.to_lowercase();
        if inner.emails.contains_key(&email) {
            return Err(StoreError::EmailTaken);
        }
        inner.emails.insert(email, user.id);
        inner.tokens.insert(user.api_token.clone(), user.id);
        let id = user.id;
        for gone in inner.users.insert(id, user) {
            inner.tokens.remove(&gone.api_token);
            inner.emails.remove(&gone.email.to_lowercase());
            inner.user_orders.remove(&gone.id);
        }
        Ok(())
    }

    /// A user by id.
    pub fn user(&self, id: u64) -> Option<User> {
        self.lock().users.get(id).cloned()
    }

    /// The user a bearer token belongs to.
    pub fn user_by_token(&self, token: &str) -> Option<User> {
        let inner = self.lock();
        let id = *inner.tokens.get(token)?;
        inner.users.get(id).cloned()
    }

    /// The user with this e-mail address.
    pub fn user_by_email(&self, email: &str) -> Option<User> {
        let inner = self.lock();
        let id = *inner.emails.get(&email.to_lowercase())?;
        inner.users.get(id).cloned()
    }

    /// Stores a new cart.
    pub fn add_cart(&self, cart: Cart) {
        self.lock().carts.insert(cart.id, cart);
    }

    /// A cart by id.
    pub fn cart(&self, id: u64) -> Option<Cart> {
        self.lock().carts.get(id).cloned()
    }

    /// Changes a cart in place and returns the result.
    pub fn update_cart<R>(&self, id: u64, f: impl FnOnce(&mut Cart) -> R) -> Result<R, StoreError> {
        let mut inner = self.lock();
        let cart = inner.carts.get_mut(id).ok_or(StoreError::NotFound("cart"))?;
        Ok(f(cart))
    }

    /// Removes a cart (after checkout).
    pub fn remove_cart(&self, id: u64) -> Option<Cart> {
        self.lock().carts.remove(id)
    }

    /// Takes `qty` of each product out of stock, all or nothing.
    pub fn take_stock(&self, lines: &[(u64, u32)]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for &(product_id, qty) in lines {
            let wanted: u64 = lines.iter().filter(|(p, _)| *p == product_id).map(|(_, q)| u64::from(*q)).sum();
            let product = inner.products.iter().find(|p| p.id == product_id).ok_or(StoreError::NotFound("product"))?;
            if u64::from(product.stock) < wanted.max(u64::from(qty)) {
                return Err(StoreError::OutOfStock { product_id, available: product.stock });
            }
        }
        for &(product_id, qty) in lines {
            if let Some(product) = inner.products.iter_mut().find(|p| p.id == product_id) {
                product.stock -= qty;
            }
        }
        Ok(())
    }

    /// Puts stock back (a checkout that failed after taking it).
    pub fn return_stock(&self, lines: &[(u64, u32)]) {
        let mut inner = self.lock();
        for &(product_id, qty) in lines {
            if let Some(product) = inner.products.iter_mut().find(|p| p.id == product_id) {
                product.stock = product.stock.saturating_add(qty);
            }
        }
    }

    /// Stores a new order and indexes it under its customer.
    pub fn add_order(&self, order: Order) {
        let mut inner = self.lock();
        let (id, user_id) = (order.id, order.customer.user_id);
        for gone in inner.orders.insert(id, order) {
            if let Some(list) = inner.user_orders.get_mut(&gone.customer.user_id) {
                list.retain(|&o| o != gone.id);
            }
        }
        let list = inner.user_orders.entry(user_id).or_default();
        list.push_back(id);
        while list.len() > 100 {
            list.pop_front();
        }
    }

    /// An order by id.
    pub fn order(&self, id: u64) -> Option<Order> {
        self.lock().orders.get(id).cloned()
    }

    /// Changes an order in place and returns the result.
    pub fn update_order<R>(&self, id: u64, f: impl FnOnce(&mut Order) -> R) -> Result<R, StoreError> {
        let mut inner = self.lock();
        let order = inner.orders.get_mut(id).ok_or(StoreError::NotFound("order"))?;
        Ok(f(order))
    }

    /// A user's recent order ids, oldest first.
    pub fn orders_of(&self, user_id: u64) -> Vec<u64> {
        self.lock().user_orders.get(&user_id).map(|l| l.iter().copied().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_evicts_its_oldest_entry() {
        let mut b = Bounded::new(2);
        assert!(b.insert(1, "a").is_empty());
        assert!(b.insert(2, "b").is_empty());
        assert_eq!(b.insert(3, "c"), vec!["a"]);
        assert!(b.get(1).is_none());
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn stock_is_taken_all_or_nothing() {
        let product = |id, stock| Product {
            id,
            sku: format!("S{id}"),
            name: "x".into(),
            category: "home".into(),
            price_cents: 100,
            stock,
        };
        let store = Store::new(vec![product(1, 5), product(2, 1)], Capacity::default());
        assert_eq!(store.take_stock(&[(1, 2), (2, 2)]), Err(StoreError::OutOfStock { product_id: 2, available: 1 }));
        assert_eq!(store.product(1).map(|p| p.stock), Some(5));
        assert_eq!(store.take_stock(&[(1, 3), (1, 3)]), Err(StoreError::OutOfStock { product_id: 1, available: 5 }));
        store.take_stock(&[(1, 2), (2, 1)]).unwrap();
        assert_eq!(store.product(2).map(|p| p.stock), Some(0));
    }
}
