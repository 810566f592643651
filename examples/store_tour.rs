fn main() {
    println!("sheaf store tour: coming with the store");
}
